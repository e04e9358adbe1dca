"""The AEGAN objective (Lazarou 2020) and the plain-GAN baseline, in one code path.

The generator/encoder passes are computed once per step (:func:`forward`); the discriminator loss
reads them detached, the G+E loss reads them through the freshly updated discriminators. Each loss
function has the same signature ``(nets, x, passes, cfg, ...) -> {name: scalar term}`` and returns
unweighted terms under hierarchical names; :func:`weighted_total` applies the config's weights.

Adversarial terms are the non-saturating logistic loss: ``softplus(-D(real))`` to call a sample
real, ``softplus(D(fake))`` to call it fake.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.config import LossConfig


@dataclass
class Passes:
    """What G and E produce from one batch of data ``x`` and prior samples ``z``."""

    z: torch.Tensor  # (B, L) prior samples
    x_fake: torch.Tensor  # G(z)
    z_enc: torch.Tensor | None = None  # E(x)            (aegan only)
    x_rec: torch.Tensor | None = None  # G(E(x))         (aegan only)
    z_rec: torch.Tensor | None = None  # E(G(z))         (aegan only)


def forward(nets: dict[str, nn.Module], x: torch.Tensor, z: torch.Tensor) -> Passes:
    x_fake = nets["G"](z)
    if "E" not in nets:
        return Passes(z, x_fake)
    z_enc = nets["E"](x)
    return Passes(z, x_fake, z_enc, nets["G"](z_enc), nets["E"](x_fake))


def _real(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits).mean()


def _fake(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits).mean()


def _noisy(x: torch.Tensor, std: float) -> torch.Tensor:
    """Instance noise for the image discriminator (helps early, decays to zero)."""
    return x + std * torch.randn_like(x) if std > 0 else x


def discriminator_loss(
    nets: dict[str, nn.Module], x: torch.Tensor, p: Passes, noise_std: float = 0.0
) -> dict[str, torch.Tensor]:
    """Dx: real x vs G(z) and G(E(x)); Dz: prior z vs E(x) and E(G(z)). Generator side detached."""
    dx = nets["Dx"]
    terms = {
        "loss/Dx/real": _real(dx(_noisy(x, noise_std))),
        "loss/Dx/fake": _fake(dx(_noisy(p.x_fake.detach(), noise_std))),
    }
    if p.z_enc is not None:
        dz = nets["Dz"]
        terms["loss/Dx/recon"] = _fake(dx(_noisy(p.x_rec.detach(), noise_std)))
        terms["loss/Dz/prior"] = _real(dz(p.z))
        terms["loss/Dz/encoded"] = _fake(dz(p.z_enc.detach()))
        terms["loss/Dz/recon"] = _fake(dz(p.z_rec.detach()))
    return terms


def generator_encoder_loss(
    nets: dict[str, nn.Module], x: torch.Tensor, p: Passes, noise_std: float = 0.0
) -> dict[str, torch.Tensor]:
    """G and E fool both discriminators on all four passes and reconstruct x and z."""
    dx = nets["Dx"]
    terms = {"loss/G/adv_x": _real(dx(_noisy(p.x_fake, noise_std)))}
    if p.z_enc is not None:
        dz = nets["Dz"]
        terms["loss/GE/adv_x_recon"] = _real(dx(_noisy(p.x_rec, noise_std)))
        # The latent adversarial signal reaches E through Dz(E(x)) and Dz(E(G(z))): it must be
        # computed from the latent passes, not copied from the image terms.
        terms["loss/E/adv_z"] = _real(dz(p.z_enc))
        terms["loss/GE/adv_z_recon"] = _real(dz(p.z_rec))
        terms["loss/GE/recon_x"] = (p.x_rec - x).abs().mean()
        terms["loss/GE/recon_z"] = (p.z_rec - p.z).pow(2).mean()
    return terms


def weighted_total(
    terms: dict[str, torch.Tensor], cfg: LossConfig, recon_x_weight: float | None = None
) -> torch.Tensor:
    """Sum of the terms with the config's weights. Discriminator fakes are averaged so real and
    fake weigh the same whatever the number of fake kinds. The loss weights set the balance of the
    AEGAN terms; a GAN's generator has one term, weighted 1, so a GAN run is the same whatever
    weights its config carries."""
    recon_x = cfg.recon_x if recon_x_weight is None else recon_x_weight
    weights = {
        "loss/Dx/real": 1.0,
        "loss/Dz/prior": 1.0,
        "loss/G/adv_x": cfg.adv_x if cfg.mode == "aegan" else 1.0,
        "loss/GE/adv_x_recon": cfg.adv_x,
        "loss/E/adv_z": cfg.adv_z,
        "loss/GE/adv_z_recon": cfg.adv_z,
        "loss/GE/recon_x": recon_x,
        "loss/GE/recon_z": cfg.recon_z,
    }
    dx_fakes = [k for k in terms if k in ("loss/Dx/fake", "loss/Dx/recon")]
    dz_fakes = [k for k in terms if k in ("loss/Dz/encoded", "loss/Dz/recon")]
    for group in (dx_fakes, dz_fakes):
        for k in group:
            weights[k] = 1.0 / len(group)
    return sum(weights[k] * v for k, v in terms.items())
