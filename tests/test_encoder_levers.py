"""The encoder's levers as training settings: the encoder stage after the joint steps, batch-norm
statistics recomputed for the EMA networks, and reconstruction inside G's own batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fmnist_data import needs_fmnist

from training.checkpoint import load_checkpoint
from training.config import ConfigError, RunConfig, from_preset, validate
from training.losses import encoder_stage_forward, encoder_stage_loss, forward
from training.networks import build_networks
from training.schedules import ENCODER_STAGE, recompute_batch_norm
from training.training_loop import train


def tiny_config(**train_overrides) -> RunConfig:
    cfg = from_preset("tiny")
    cfg.data.limit = 256
    cfg.train.progress = False
    cfg.train.steps = 4
    cfg.train.log_every = 2
    cfg.train.image_every = 0
    cfg.train.checkpoint_every = 3
    for key, value in train_overrides.items():
        setattr(cfg.train, key, value)
    return validate(cfg)


def state_of(path: Path, group: str, net: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_checkpoint(path)[group][net].items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- settings -------------------------------------------------------------------------------


def test_lever_settings_are_checked_and_named():
    for assignment, flag in (
        (("train", "encoder_stage_steps", -1), "--encoder-stage-steps"),
        (("train", "bn_recompute_batches", -2), "train.bn_recompute_batches"),
        (("optim", "lr_encoder_stage", 0.0), "optim.lr_encoder_stage"),
    ):
        cfg = from_preset("tiny")
        section, name, value = assignment
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ConfigError, match=flag):
            validate(cfg)
    cfg = from_preset("tiny")
    cfg.loss.mode, cfg.train.encoder_stage_steps = "gan", 5
    with pytest.raises(ConfigError, match="needs --mode aegan"):
        validate(cfg)
    cfg = RunConfig.from_dict(from_preset("tiny").to_dict())
    assert (cfg.train.encoder_stage_steps, cfg.train.bn_recompute_batches) == (0, 0)
    assert cfg.loss.recon_in_g_batch is False


# --- the encoder stage ----------------------------------------------------------------------


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    cfg = from_preset("tiny")
    cfg.model.data_shape = [1, 28, 28]
    return build_networks(cfg.model, "aegan"), cfg


def test_encoder_stage_gradients_reach_e_and_never_g():
    nets, cfg = _nets()
    decoder = nets["G"].eval().requires_grad_(False)
    x, z = torch.rand(6, 1, 28, 28) * 2 - 1, torch.randn(6, cfg.model.latent_dim)
    passes = encoder_stage_forward(nets["E"], decoder, x, z)
    assert not passes.x_fake.requires_grad  # G(z) needs no graph
    terms = encoder_stage_loss(nets, x, passes)
    assert set(terms) == {
        "loss/E/adv_z",
        "loss/GE/adv_z_recon",
        "loss/GE/recon_x",
        "loss/GE/recon_z",
    }
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["E"].parameters())
    assert all(p.grad is None for p in nets["G"].parameters())
    assert all(p.grad is None for p in nets["Dz"].parameters())  # Dz frozen in E's step
    # Eval-mode batch norm: G(E(x)) of one sample does not depend on the rest of the batch.
    alone = encoder_stage_forward(nets["E"].eval(), decoder, x[:1], z[:1]).x_rec
    together = encoder_stage_forward(nets["E"], decoder, x, z).x_rec[:1]
    assert torch.allclose(alone, together, atol=1e-6)


@needs_fmnist
def test_encoder_stage_trains_e_against_the_frozen_ema_generator(tmp_path):
    joint = train(tiny_config(), tmp_path / "joint")
    staged = train(tiny_config(encoder_stage_steps=3), tmp_path / "staged")
    assert staged.name == "step-0000007.pt"
    # The joint steps are the same run; the stage leaves both generators as they were.
    assert same(state_of(joint, "ema", "G"), state_of(staged, "ema", "G"))
    assert same(state_of(joint, "nets", "G"), state_of(staged, "nets", "G"))
    assert same(state_of(joint, "nets", "Dx"), state_of(staged, "nets", "Dx"))
    assert not same(state_of(joint, "ema", "E"), state_of(staged, "ema", "E"))
    assert not same(state_of(joint, "nets", "Dz"), state_of(staged, "nets", "Dz"))
    state = load_checkpoint(staged)
    assert ENCODER_STAGE in state["optim"] and state["config"]["train"]["encoder_stage_steps"] == 3
    records = [
        json.loads(r) for r in (tmp_path / "staged" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [2, 4, 6, 7]
    assert "loss/Dx/real" not in records[-1] and "loss/GE/recon_x" in records[-1]


@needs_fmnist
def test_encoder_stage_resumes_to_the_same_weights(tmp_path):
    straight = train(tiny_config(encoder_stage_steps=3, bn_recompute_batches=2), tmp_path / "a")
    run = tmp_path / "b"
    train(tiny_config(encoder_stage_steps=3, bn_recompute_batches=2), run)
    (run / "checkpoints" / "step-0000007.pt").unlink()  # killed after step 6's checkpoint
    resumed = train(None, run, resume=True)
    for group, net in (("ema", "G"), ("ema", "E"), ("nets", "E"), ("nets", "Dz")):
        assert same(state_of(straight, group, net), state_of(resumed, group, net)), (group, net)


# --- batch-norm statistics of the EMA networks ----------------------------------------------


def test_recomputed_statistics_are_those_of_the_networks_own_inputs():
    nets, cfg = _nets()
    cfg.train.bn_recompute_batches, cfg.train.batch_size = 3, 16
    samples = torch.rand(64, 1, 28, 28) * 2 - 1
    ema = {"G": nets["G"], "E": nets["E"]}
    norm = ema["G"].project[1]  # batch norm after G's first linear layer
    assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))  # fresh
    recompute_batch_norm(ema, samples, cfg, torch.device("cpu"))
    first = {k: v.clone() for k, v in ema["G"].state_dict().items()}
    # The mean over the batches it saw: the linear layer's outputs on the prior draws.
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + 17)
    zs = torch.cat([torch.randn(16, cfg.model.latent_dim, generator=gen) for _ in range(3)])
    with torch.no_grad():
        assert torch.allclose(norm.running_mean, ema["G"].project[0](zs).mean(0), atol=1e-5)
    assert norm.momentum == 0.1  # restored after the cumulative average
    recompute_batch_norm(ema, samples, cfg, torch.device("cpu"))  # same seed: same statistics
    assert same(first, ema["G"].state_dict())


@needs_fmnist
def test_checkpoints_hold_recomputed_statistics_and_training_is_unchanged(tmp_path):
    plain = train(tiny_config(), tmp_path / "plain")
    recomputed = train(tiny_config(bn_recompute_batches=2), tmp_path / "recomputed")
    assert same(state_of(plain, "nets", "G"), state_of(recomputed, "nets", "G"))
    ema_plain, ema_re = state_of(plain, "ema", "G"), state_of(recomputed, "ema", "G")
    buffers = [k for k in ema_plain if "running_mean" in k]
    assert buffers and all(not torch.equal(ema_plain[k], ema_re[k]) for k in buffers)
    weights = [k for k in ema_plain if k.endswith("weight")]
    assert all(torch.equal(ema_plain[k], ema_re[k]) for k in weights)


# --- reconstruction inside G's own batch ----------------------------------------------------


class CountingG(torch.nn.Module):
    def __init__(self, g: torch.nn.Module) -> None:
        super().__init__()
        self.g, self.calls = g, []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(z))
        return self.g(z)


def test_recon_in_g_batch_is_one_g_pass_over_prior_and_codes():
    nets, cfg = _nets()
    nets["G"] = CountingG(nets["G"])
    x, z = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randn(8, cfg.model.latent_dim)
    joint = forward(nets, x, z, recon_count=4, recon_in_g_batch=True)
    assert nets["G"].calls == [12]  # 8 prior draws and 4 codes, one call
    assert joint.x_fake.shape[0] == 8 and joint.x_rec.shape[0] == 4
    nets["G"].calls.clear()
    separate = forward(nets, x, z, recon_count=4)
    assert nets["G"].calls == [8, 4]
    # Same encodings of x; G's outputs differ only through the shared batch statistics.
    assert torch.allclose(joint.z_enc, separate.z_enc)
    assert not torch.allclose(joint.x_fake, separate.x_fake)
    nets["G"].eval()
    joint, separate = (forward(nets, x, z, 4, recon_in_g_batch=flag) for flag in (True, False))
    assert torch.allclose(joint.x_fake, separate.x_fake, atol=1e-6)
    assert torch.allclose(joint.x_rec, separate.x_rec, atol=1e-6)


@needs_fmnist
def test_training_passes_recon_in_g_batch_to_the_passes(tmp_path):
    cfg = tiny_config()
    cfg.loss.recon_in_g_batch = True
    final = train(cfg, tmp_path)
    assert load_checkpoint(final)["config"]["loss"]["recon_in_g_batch"] is True
    assert not same(
        state_of(final, "nets", "G"), state_of(train(tiny_config(), tmp_path / "b"), "nets", "G")
    )


@needs_fmnist
def test_a_finished_run_gets_an_encoder_stage_on_resume(tmp_path):
    joint = train(tiny_config(), tmp_path)
    generator = state_of(joint, "ema", "G")
    staged = train(None, tmp_path, resume=True, encoder_stage_steps=2)
    assert staged.name == "step-0000006.pt"
    assert same(generator, state_of(staged, "ema", "G"))
    assert load_checkpoint(staged)["config"]["train"]["encoder_stage_steps"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["train"]["encoder_stage_steps"] == 2
