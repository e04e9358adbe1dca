"""The AEGAN objective (Lazarou 2020) and the plain-GAN baseline, in one code path.

The generator/encoder passes are computed once per step (:func:`forward`); the discriminator loss
reads them detached, the G+E loss reads them through the freshly updated discriminators. Each loss
function has the same signature ``(nets, x, passes, noise_std, *, recon_adv) -> {name: scalar
term}`` and returns unweighted terms under hierarchical names; :func:`weighted_total` applies the
config's weights. ``recon_adv=False`` (``loss.adv_x_recon = 0``) leaves the reconstructions G(E(x))
out of the image adversarial game on both sides, and Dx's pass over them out of the step.

Adversarial terms are the non-saturating logistic loss: ``softplus(-D(real))`` to call a sample
real, ``softplus(D(fake))`` to call it fake.

Cost. Inputs of several kinds go through a network in one call (concatenated, logits split
again) wherever the network has no batch norm, so the result equals separate calls up to rounding: E
encodes x and G(z) together, Dx sees real, G(z) and G(E(x)) at once, Dz the prior, E(x) and
E(G(z)). G keeps one call per input kind where it has batch norm (the conv family): a joint call
would normalise G(z) and G(E(x)) with shared batch statistics, a different objective. In the G+E
step the discriminators run with their weights frozen: their gradients would be thrown away (the
D step clears them), so only the gradients to their inputs, which reach G and E, are computed.
``loss.recon_share`` below 1 reconstructs only the first samples of each batch (``recon_count``
of :func:`forward`): the second pass of G, the largest extra cost of an AEGAN step, shrinks with it.

``loss.encoder_noise`` above 0 makes E stochastic (Makhzani et al.'s adversarial autoencoder with
a Gaussian posterior): each encoding is a draw around E's output, so the codes of data made of
tight clusters can fill the prior instead of sitting on points between which the prior's samples
fall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from training.config import LossConfig

Net = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Passes:
    """What G and E produce from one batch of data ``x`` and prior samples ``z``."""

    z: torch.Tensor  # (B, L) prior samples
    x_fake: torch.Tensor  # G(z)
    z_enc: torch.Tensor | None = None  # E(x)            (aegan only)
    x_rec: torch.Tensor | None = None  # G(E(x))         (aegan only)
    z_rec: torch.Tensor | None = None  # E(G(z))         (aegan only)

    def encoder_passes(self) -> EncoderPasses | None:
        """The passes through E of an AEGAN step (None for a GAN's)."""
        if self.z_enc is None or self.x_rec is None or self.z_rec is None:
            return None
        return EncoderPasses(self.z_enc, self.x_rec, self.z_rec)


@dataclass
class EncoderPasses:
    """E(x), G(E(x)) and E(G(z)) of an AEGAN step."""

    z_enc: torch.Tensor
    x_rec: torch.Tensor
    z_rec: torch.Tensor


def has_batch_norm(net: Net) -> bool:
    """Whether a batch-norm layer would mix the samples of one call (plain functions: no)."""
    return isinstance(net, nn.Module) and any(isinstance(m, _BatchNorm) for m in net.modules())


def run_joint(net: Net, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[net(t) for t in inputs]``, in one call on their concatenation when the network has no
    batch norm (the same values up to rounding, one pass of the weights instead of several)."""
    if len(inputs) == 1 or has_batch_norm(net):
        return [net(t) for t in inputs]
    return list(net(torch.cat(list(inputs))).split([len(t) for t in inputs]))


@contextmanager
def frozen(*nets: Net) -> Iterator[list[Net]]:
    """The networks with their weights marked as not needing gradients while the block records
    its graph; gradients still flow through them to their inputs. A DDP-wrapped network is called
    unwrapped, so DDP waits for no gradients of weights that get none."""
    plain = [net.module if isinstance(net, DistributedDataParallel) else net for net in nets]
    params = [
        p
        for net in plain
        if isinstance(net, nn.Module)
        for p in net.parameters()
        if p.requires_grad
    ]
    for p in params:
        p.requires_grad_(False)
    try:
        yield plain
    finally:
        for p in params:
            p.requires_grad_(True)


def forward(
    nets: dict[str, nn.Module],
    x: torch.Tensor,
    z: torch.Tensor,
    recon_count: int | None = None,
    encoder_noise: float = 0.0,
    recon_in_g_batch: bool = False,
) -> Passes:
    """G(z) and, for an AEGAN, E(x), E(G(z)) and G(E(x)) of the first ``recon_count`` samples of
    x (all of them by default; fewer make the second pass of G cheaper). ``encoder_noise`` > 0
    makes the encoder stochastic: each encoding is E's output plus Gaussian noise of that std
    (drawn for E(x), then E(G(z))), and that draw is what G, Dz and the latent terms see.
    ``recon_in_g_batch``: G(z) and G(E(x)) come from one G call on [z; E(x)] (batch norm
    normalises both kinds together), E(x) first and E(G(z)) after it."""
    if "E" in nets and recon_in_g_batch:
        return _forward_one_g_pass(nets, x, z, recon_count, encoder_noise)
    x_fake = nets["G"](z)  # G(z)
    if "E" not in nets:
        return Passes(z, x_fake)
    z_enc, z_rec = run_joint(nets["E"], [x, x_fake])  # E(x), E(G(z))
    if encoder_noise > 0:
        z_enc = z_enc + encoder_noise * torch.randn_like(z_enc)
        z_rec = z_rec + encoder_noise * torch.randn_like(z_rec)
    x_rec = nets["G"](z_enc[:recon_count])  # G(E(x)): waits for E(x)
    return Passes(z, x_fake, z_enc, x_rec, z_rec)


def _forward_one_g_pass(
    nets: dict[str, nn.Module],
    x: torch.Tensor,
    z: torch.Tensor,
    recon_count: int | None,
    encoder_noise: float,
) -> Passes:
    z_enc = nets["E"](x)  # E(x)
    if encoder_noise > 0:
        z_enc = z_enc + encoder_noise * torch.randn_like(z_enc)
    codes = z_enc[:recon_count]
    x_fake, x_rec = nets["G"](torch.cat([z, codes])).split([len(z), len(codes)])  # [G(z); G(E(x))]
    z_rec = nets["E"](x_fake)  # E(G(z))
    if encoder_noise > 0:
        z_rec = z_rec + encoder_noise * torch.randn_like(z_rec)
    return Passes(z, x_fake, z_enc, x_rec, z_rec)


def encoder_stage_forward(
    encoder: nn.Module,
    decoder: nn.Module,
    x: torch.Tensor,
    z: torch.Tensor,
    encoder_noise: float = 0.0,
) -> Passes:
    """The passes of the encoder stage: ``decoder`` is the frozen generator (weights without
    gradients, batch norm in eval mode), so G(z) needs no graph; gradients reach E through
    G(E(x))."""
    with torch.no_grad():
        x_fake = decoder(z)  # G(z), fixed
    z_enc, z_rec = run_joint(encoder, [x, x_fake])  # E(x), E(G(z))
    if encoder_noise > 0:
        z_enc = z_enc + encoder_noise * torch.randn_like(z_enc)
        z_rec = z_rec + encoder_noise * torch.randn_like(z_rec)
    return Passes(z, x_fake, z_enc, decoder(z_enc), z_rec)


def latent_discriminator_loss(nets: dict[str, nn.Module], p: Passes) -> dict[str, torch.Tensor]:
    """The encoder stage's D step: Dz alone, prior z against E(x) and E(G(z)) (detached)."""
    assert p.z_enc is not None and p.z_rec is not None
    prior, encoded, recon = run_joint(nets["Dz"], [p.z, p.z_enc.detach(), p.z_rec.detach()])
    return {
        "loss/Dz/prior": _real(prior),
        "loss/Dz/encoded": _fake(encoded),
        "loss/Dz/recon": _fake(recon),
    }


def encoder_stage_loss(
    nets: dict[str, nn.Module], x: torch.Tensor, p: Passes
) -> dict[str, torch.Tensor]:
    """The encoder stage's E step: fool Dz on E(x) and E(G(z)), reconstruct x through the frozen
    G and z through E (the AEGAN's terms that reach E, under their usual names)."""
    assert p.z_enc is not None and p.z_rec is not None and p.x_rec is not None
    with frozen(nets["Dz"]) as (dz,):
        encoded, recon = run_joint(dz, [p.z_enc, p.z_rec])
    return {
        "loss/E/adv_z": _real(encoded),
        "loss/GE/adv_z_recon": _real(recon),
        "loss/GE/recon_x": (p.x_rec - x[: len(p.x_rec)]).abs().mean(),
        "loss/GE/recon_z": (p.z_rec - p.z).pow(2).mean(),
    }


def recon_count(batch_size: int, share: float) -> int:
    """How many samples of a batch ``loss.recon_share`` reconstructs: at least 2 (batch norm)."""
    return min(batch_size, max(2, round(share * batch_size)))


def _real(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits).mean()


def _fake(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits).mean()


def _noisy(x: torch.Tensor, std: float) -> torch.Tensor:
    """Instance noise for the image discriminator (helps early, decays to zero)."""
    return x + std * torch.randn_like(x) if std > 0 else x


def discriminator_loss(
    nets: dict[str, nn.Module],
    x: torch.Tensor,
    p: Passes,
    noise_std: float = 0.0,
    *,
    recon_adv: bool = True,
) -> dict[str, torch.Tensor]:
    """Dx: real x vs G(z) and (``recon_adv``) G(E(x)); Dz: prior z vs E(x) and E(G(z)). Generator
    side detached."""
    enc = p.encoder_passes()
    images = [x, p.x_fake.detach()]
    if enc is not None and recon_adv:
        images.append(enc.x_rec.detach())
    # Noise is drawn per input kind, in the order real, G(z), G(E(x)).
    logits = run_joint(nets["Dx"], [_noisy(t, noise_std) for t in images])
    terms = {"loss/Dx/real": _real(logits[0]), "loss/Dx/fake": _fake(logits[1])}
    if enc is not None and recon_adv:
        terms["loss/Dx/recon"] = _fake(logits[2])
    if enc is not None:
        prior, encoded, recon = run_joint(nets["Dz"], [p.z, enc.z_enc.detach(), enc.z_rec.detach()])
        terms["loss/Dz/prior"] = _real(prior)
        terms["loss/Dz/encoded"] = _fake(encoded)
        terms["loss/Dz/recon"] = _fake(recon)
    return terms


def generator_encoder_loss(
    nets: dict[str, nn.Module],
    x: torch.Tensor,
    p: Passes,
    noise_std: float = 0.0,
    *,
    recon_adv: bool = True,
) -> dict[str, torch.Tensor]:
    """G and E fool both discriminators on all four passes (G(E(x)) only with ``recon_adv``) and
    reconstruct x and z."""
    enc = p.encoder_passes()
    with frozen(*[nets[k] for k in ("Dx", "Dz") if k in nets]) as discriminators:
        dx = discriminators[0]
        images = [p.x_fake, enc.x_rec] if enc is not None and recon_adv else [p.x_fake]
        logits = run_joint(dx, [_noisy(t, noise_std) for t in images])  # noise: G(z), G(E(x))
        terms = {"loss/G/adv_x": _real(logits[0])}
        if enc is not None:
            dz = discriminators[1]
            if recon_adv:
                terms["loss/GE/adv_x_recon"] = _real(logits[1])
            # The latent adversarial signal reaches E through Dz(E(x)) and Dz(E(G(z))): it must be
            # computed from the latent passes, not copied from the image terms.
            encoded, recon = run_joint(dz, [enc.z_enc, enc.z_rec])
            terms["loss/E/adv_z"] = _real(encoded)
            terms["loss/GE/adv_z_recon"] = _real(recon)
    if enc is not None:
        terms["loss/GE/recon_x"] = (enc.x_rec - x[: len(enc.x_rec)]).abs().mean()
        terms["loss/GE/recon_z"] = (enc.z_rec - p.z).pow(2).mean()
    return terms


def weighted_total(
    terms: dict[str, torch.Tensor], cfg: LossConfig, recon_x_weight: float | None = None
) -> torch.Tensor:
    """Sum of the terms with the config's weights. A discriminator's fake kinds form a weighted
    average (G(E(x)) weighted ``adv_x_recon``, the others 1), so real and fake weigh the same
    whatever the number of fake kinds. The loss weights set the balance of the
    AEGAN terms; a GAN's generator has one term, weighted 1, so a GAN run is the same whatever
    weights its config carries."""
    recon_x = cfg.recon_x if recon_x_weight is None else recon_x_weight
    weights = {
        "loss/Dx/real": 1.0,
        "loss/Dz/prior": 1.0,
        "loss/G/adv_x": cfg.adv_x if cfg.mode == "aegan" else 1.0,
        "loss/GE/adv_x_recon": cfg.adv_x * cfg.adv_x_recon,
        "loss/E/adv_z": cfg.adv_z,
        "loss/GE/adv_z_recon": cfg.adv_z,
        "loss/GE/recon_x": recon_x,
        "loss/GE/recon_z": cfg.recon_z,
    }
    # Each fake kind's share: 1 each, but adv_x_recon for G(E(x)).
    shares = {"loss/Dx/recon": cfg.adv_x_recon}
    dx_fakes = [k for k in terms if k in ("loss/Dx/fake", "loss/Dx/recon")]
    dz_fakes = [k for k in terms if k in ("loss/Dz/encoded", "loss/Dz/recon")]
    for group in (dx_fakes, dz_fakes):
        for k in group:
            weights[k] = shares.get(k, 1.0) / sum(shares.get(j, 1.0) for j in group)
    total = sum(weights[k] * v for k, v in terms.items())
    assert isinstance(total, torch.Tensor), "no loss terms to weigh"
    return total
