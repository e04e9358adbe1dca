"""The losses' cheaper passes compute the same objective: joint calls on concatenated inputs only
where a network has no batch norm, discriminators frozen in the G+E step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.config import ModelConfig
from training.losses import (
    discriminator_loss,
    forward,
    frozen,
    generator_encoder_loss,
    has_batch_norm,
    run_joint,
)
from training.networks import build_networks


def _nets(arch: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if arch == "conv":
        cfg = ModelConfig(arch="conv", latent_dim=8, width=4, hidden=16, data_shape=[1, 28, 28])
        x = torch.rand(6, 1, 28, 28) * 2 - 1
    else:
        cfg = ModelConfig(arch="mlp", latent_dim=3, hidden=16, depth=2, data_shape=[5])
        x = torch.randn(6, 5)
    return build_networks(cfg), x, torch.randn(6, cfg.latent_dim)


def _reference(nets: dict, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The objective written the plain way: one call per pass, nothing frozen."""
    g, e, dx, dz = nets["G"], nets["E"], nets["Dx"], nets["Dz"]
    x_fake, z_enc = g(z), e(x)
    x_rec, z_rec = g(z_enc), e(x_fake)
    real, fake = (lambda t: F.softplus(-t).mean()), (lambda t: F.softplus(t).mean())
    return {
        "loss/Dx/real": real(dx(x)),
        "loss/Dx/fake": fake(dx(x_fake.detach())),
        "loss/Dx/recon": fake(dx(x_rec.detach())),
        "loss/Dz/prior": real(dz(z)),
        "loss/Dz/encoded": fake(dz(z_enc.detach())),
        "loss/Dz/recon": fake(dz(z_rec.detach())),
        "loss/G/adv_x": real(dx(x_fake)),
        "loss/GE/adv_x_recon": real(dx(x_rec)),
        "loss/E/adv_z": real(dz(z_enc)),
        "loss/GE/adv_z_recon": real(dz(z_rec)),
        "loss/GE/recon_x": (x_rec - x).abs().mean(),
        "loss/GE/recon_z": (z_rec - z).pow(2).mean(),
    }


def _grads(nets: dict, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": p.grad.clone()
        for n in names
        for k, p in nets[n].named_parameters()
        if p.grad is not None
    }


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_same_terms_and_generator_gradients_as_one_call_per_pass(arch):
    nets, x, z = _nets(arch)
    ref = _reference(nets, x, z)
    ge_names = [k for k in ref if k.startswith("loss/G")] + ["loss/E/adv_z"]
    sum(ref[k] for k in ge_names).backward()
    ref_grads = _grads(nets, ("G", "E"))
    for net in nets.values():
        net.zero_grad(set_to_none=True)

    p = forward(nets, x, z)
    terms = {**discriminator_loss(nets, x, p), **generator_encoder_loss(nets, x, p)}
    assert set(terms) == set(ref)
    for k in ref:
        assert terms[k].item() == pytest.approx(ref[k].item(), rel=1e-5, abs=1e-7), k
    sum(terms[k] for k in ge_names).backward()
    grads = _grads(nets, ("G", "E"))
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        assert torch.allclose(grads[k], g, rtol=1e-4, atol=1e-7), k
    # The G+E terms leave the discriminators' weights without gradients (the D step's own).
    assert all(p.grad is None for n in ("Dx", "Dz") for p in nets[n].parameters())
    assert all(p.requires_grad for net in nets.values() for p in net.parameters())


def test_only_networks_without_batch_norm_get_joint_calls():
    nets, x, z = _nets("conv")
    assert has_batch_norm(nets["G"])
    assert not any(has_batch_norm(nets[k]) for k in ("E", "Dx", "Dz"))
    calls = {k: [] for k in nets}
    for k, net in nets.items():
        net.register_forward_hook(lambda m, inp, out, k=k: calls[k].append(len(inp[0])))
    p = forward(nets, x, z)
    discriminator_loss(nets, x, p)
    generator_encoder_loss(nets, x, p)
    assert calls["G"] == [6, 6]  # G(z) and G(E(x)) apart: batch statistics per input kind
    assert calls["E"] == [12]  # E(x) and E(G(z)) together
    assert calls["Dx"] == [18, 12]  # D step: real, G(z), G(E(x)); G+E step: G(z), G(E(x))
    assert calls["Dz"] == [18, 12]


def test_run_joint_splits_in_input_order_and_frozen_restores_on_error():
    double = torch.nn.Linear(1, 1, bias=False)
    double.weight.data.fill_(2.0)
    a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[5.0]])
    out = run_joint(double, [a, b])
    assert [t.tolist() for t in out] == [[[2.0], [4.0]], [[10.0]]]
    with pytest.raises(RuntimeError), frozen(double):
        assert not double.weight.requires_grad
        raise RuntimeError("boom")
    assert double.weight.requires_grad
