"""Training: config checks, data loaders, networks, losses, loop, checkpoints, resume, CLI."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
)
from training.cli import main
from training.config import ConfigError, ModelConfig, RunConfig, from_preset, validate
from training.data import DataError, load_fashion_mnist, load_image_folder, load_npy
from training.losses import discriminator_loss, forward, generator_encoder_loss
from training.networks import build_networks
from training.training_loop import train

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")


def tiny_config(**train_overrides) -> RunConfig:
    cfg = from_preset("tiny")
    cfg.data.limit = 256
    cfg.train.progress = False
    cfg.train.steps = 6
    cfg.train.log_every = 2
    cfg.train.image_every = 3
    cfg.train.checkpoint_every = 3
    for key, value in train_overrides.items():
        setattr(cfg.train, key, value)
    return validate(cfg)


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    flat = {}
    for group in ("nets", "ema"):
        for net, sd in state[group].items():
            flat.update({f"{group}.{net}.{k}": v for k, v in sd.items()})
    return flat


# --- config -----------------------------------------------------------------------------------


def test_presets_validate_and_round_trip():
    from training.config import PRESETS

    for name in PRESETS:
        cfg = validate(from_preset(name))
        assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("section", "field", "value", "flag"),
    [
        ("model", "arch", "resnet", "--arch"),
        ("loss", "mode", "vae", "--mode"),
        ("train", "steps", 0, "--steps"),
        ("train", "batch_size", 1, "--batch-size"),
        ("data", "image_size", 30, "--image-size"),
        ("loss", "recon_x", -1.0, "loss.recon_x"),
    ],
)
def test_validate_names_the_flag(section, field, value, flag):
    cfg = from_preset("fmnist-cpu")
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=flag):
        validate(cfg)


def test_from_dict_rejects_unknown_fields():
    raw = from_preset("tiny").to_dict()
    raw["loss"]["recon_q"] = 1.0
    with pytest.raises(ValueError, match="recon_q"):
        RunConfig.from_dict(raw)


# --- data -------------------------------------------------------------------------------------


@needs_fmnist
def test_fashion_mnist_splits_and_labels():
    train_set = load_fashion_mnist(FMNIST, "train")
    test_set = load_fashion_mnist(FMNIST, "test")
    assert train_set.samples.shape == (60000, 1, 28, 28)
    assert test_set.samples.shape == (10000, 1, 28, 28)
    assert train_set.samples.min() >= -1 and train_set.samples.max() <= 1
    assert sorted(torch.unique(test_set.labels).tolist()) == list(range(10))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_on_a_user_copy_and_its_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    data = load_fashion_mnist(tmp_path, "test")
    assert np.allclose((data.samples[:, 0].numpy() + 1) * 127.5, images, atol=1e-3)
    assert data.labels.tolist() == [0, 1, 2, 3, 4]

    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    with pytest.raises(DataError, match="5 images but 4 labels"):
        load_fashion_mnist(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist(tmp_path, "test")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: file not found"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(DataError, match="directory not found"):
        load_fashion_mnist(tmp_path / "nowhere", "train")


def test_image_folder_recursive_formats_resize_and_channels(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "one.png")
    Image.new("L", (64, 64), 128).save(tmp_path / "a" / "two.jpg")
    Image.new("RGBA", (20, 20), (0, 0, 255, 255)).save(tmp_path / "a" / "b" / "three.webp")
    (tmp_path / "notes.txt").write_text("ignored")
    rgb = load_image_folder(tmp_path, 32, 3)
    assert rgb.samples.shape == (3, 3, 32, 32)
    assert rgb.kind == "image" and rgb.labels is None
    first = rgb.samples[1]  # sorted paths: a/b/three.webp, a/two.jpg, one.png
    assert torch.allclose(
        rgb.samples[2, 0], torch.ones(32, 32), atol=1e-2
    )  # red channel of one.png
    assert first.shape == (3, 32, 32)
    grey = load_image_folder(tmp_path, 28, 1)
    assert grey.samples.shape == (3, 1, 28, 28)


def test_image_folder_errors_and_skip(tmp_path):
    with pytest.raises(DataError, match="image directory not found"):
        load_image_folder(tmp_path / "missing", 28, 1)
    with pytest.raises(DataError, match="no images found"):
        load_image_folder(tmp_path, 28, 1)
    Image.new("L", (28, 28), 10).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="bad.png: unreadable image"):
        load_image_folder(tmp_path, 28, 1, on_bad_file="fail")
    data = load_image_folder(tmp_path, 28, 1, on_bad_file="skip")
    assert len(data) == 1


def test_npy_vectors_images_and_errors(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    data = load_npy(tmp_path / "v.npy")
    assert data.kind == "vector" and data.shape == (4,)
    np.save(tmp_path / "img.npy", np.full((3, 1, 28, 28), 255, np.uint8))
    assert torch.allclose(load_npy(tmp_path / "img.npy").samples, torch.ones(3, 1, 28, 28))
    np.save(tmp_path / "rank3.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match=r"rank3.npy: array of rank 3"):
        load_npy(tmp_path / "rank3.npy")
    vectors[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", vectors)
    with pytest.raises(DataError, match="nan.npy: holds 1 NaN"):
        load_npy(tmp_path / "nan.npy")
    with pytest.raises(DataError, match="file not found"):
        load_npy(tmp_path / "none.npy")


# --- networks and losses -------------------------------------------------------------------


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3), (64, 1)])
def test_conv_networks_shapes(size, channels):
    cfg = ModelConfig(
        arch="conv", latent_dim=8, width=4, hidden=16, data_shape=[channels, size, size]
    )
    nets = build_networks(cfg)
    z = torch.randn(3, 8)
    x = nets["G"](z)
    assert x.shape == (3, channels, size, size) and x.abs().max() <= 1
    assert nets["E"](x).shape == (3, 8)
    assert nets["Dx"](x).shape == (3, 1)
    assert nets["Dz"](z).shape == (3, 1)


def test_mlp_networks_for_vectors_and_gan_mode():
    cfg = ModelConfig(arch="mlp", latent_dim=2, hidden=16, depth=2, data_shape=[5])
    nets = build_networks(cfg)
    assert nets["G"](torch.randn(4, 2)).shape == (4, 5)
    assert set(build_networks(cfg, "gan")) == {"G", "Dx"}


def _tiny_nets() -> tuple[dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="conv", latent_dim=8, width=4, hidden=16, data_shape=[1, 28, 28])
    return build_networks(cfg), torch.rand(6, 1, 28, 28) * 2 - 1, torch.randn(6, 8)


def test_encoder_gets_gradient_from_the_latent_discriminator():
    nets, x, z = _tiny_nets()
    terms = generator_encoder_loss(nets, x, forward(nets, x, z))
    terms["loss/E/adv_z"].backward()
    grads = [p.grad for p in nets["E"].parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in nets["Dx"].parameters())  # the latent term is not Dx's


def test_every_loss_term_is_finite_and_distinct():
    nets, x, z = _tiny_nets()
    p = forward(nets, x, z)
    d_terms = discriminator_loss(nets, x, p, noise_std=0.1)
    ge_terms = generator_encoder_loss(nets, x, p)
    assert len(d_terms) == 6 and len(ge_terms) == 6
    for value in {**d_terms, **ge_terms}.values():
        assert torch.isfinite(value)
    # the latent adversarial terms are computed from latents, not copied from the image terms
    assert ge_terms["loss/E/adv_z"].item() != ge_terms["loss/GE/adv_x_recon"].item()


# --- the loop -------------------------------------------------------------------------------


@needs_fmnist
def test_run_writes_grids_metrics_and_checkpoints(tmp_path):
    final = train(tiny_config(), tmp_path)
    assert final == tmp_path / "checkpoints" / "step-0000006.pt"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003.pt", "step-0000006.pt"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    for name in ("fakes-0000003.png", "recon-0000006.png"):
        assert Image.open(tmp_path / "samples" / name).format == "PNG"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    expected = {"loss/Dx/real", "loss/Dz/encoded", "loss/E/adv_z", "loss/GE/recon_x"}
    assert expected <= set(records[0]) and records[0]["images_per_s"] > 0
    state = load_checkpoint(final)
    assert set(state["nets"]) == {"G", "E", "Dx", "Dz"} and set(state["ema"]) == {"G", "E"}
    assert state["config"]["model"]["data_shape"] == [1, 28, 28]
    assert json.loads((tmp_path / "config.json").read_text()) == state["config"]


@needs_fmnist
def test_keeps_only_the_newest_checkpoints(tmp_path):
    train(tiny_config(checkpoint_every=1, keep_checkpoints=2), tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000005.pt", "step-0000006.pt"]


@needs_fmnist
def test_deterministic_on_cpu(tmp_path):
    a = weights(train(tiny_config(), tmp_path / "a"))
    b = weights(train(tiny_config(), tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_fmnist
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    straight = weights(train(tiny_config(), tmp_path / "straight"))
    run = tmp_path / "interrupted"
    train(tiny_config(), run)
    (run / "checkpoints" / "step-0000006.pt").unlink()  # as if killed after step 3's checkpoint
    resumed = weights(train(None, run, resume=True))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


@needs_fmnist
def test_resume_skips_a_truncated_checkpoint(tmp_path):
    train(tiny_config(), tmp_path)
    newest = tmp_path / "checkpoints" / "step-0000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert resolve_checkpoint(tmp_path).name == "step-0000003.pt"
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(newest)


@needs_fmnist
def test_gan_mode_trains_g_and_dx_only(tmp_path):
    cfg = tiny_config()
    cfg.loss.mode = "gan"
    state = load_checkpoint(train(cfg, tmp_path))
    assert set(state["nets"]) == {"G", "Dx"} and set(state["ema"]) == {"G"}


@needs_fmnist
def test_gan_runs_do_not_depend_on_aegan_loss_weights(tmp_path):
    """The baseline stays the same run when the AEGAN weights of a preset are retuned."""
    runs = []
    for name, adv_x in (("a", 1.0), ("b", 6.0)):
        cfg = tiny_config()
        cfg.loss.mode, cfg.loss.adv_x, cfg.loss.recon_x_final = "gan", adv_x, 0.2
        runs.append(weights(train(cfg, tmp_path / name)))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    aegan = []
    for name, adv_x in (("c", 1.0), ("d", 6.0)):
        cfg = tiny_config()
        cfg.loss.adv_x = adv_x
        aegan.append(weights(train(cfg, tmp_path / name)))
    assert not torch.equal(aegan[0]["nets.G.project.0.weight"], aegan[1]["nets.G.project.0.weight"])


# --- the command line -----------------------------------------------------------------------


def test_cli_dry_run_prints_resolved_config():
    result = CliRunner().invoke(
        main, ["train", "--preset", "fmnist-cpu", "--steps", "7", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["train"]["steps"] == 7 and resolved["preset"] == "fmnist-cpu"


def test_cli_rejects_bad_settings_naming_the_flag():
    result = CliRunner().invoke(main, ["train", "--batch-size", "1", "--dry-run"])
    assert result.exit_code == 2 and "--batch-size" in result.output
    result = CliRunner().invoke(main, ["train", "--set", "loss.nope=1", "--dry-run"])
    assert result.exit_code == 2 and "--set" in result.output


def test_cli_trains_mlp_on_vector_data(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ring.npy", rng.normal(size=(300, 2)).astype(np.float32))
    args = ["train", "--preset", "vectors-mlp", "--data", str(tmp_path / "ring.npy"),
            "--arch", "mlp", "--steps", "4", "--batch-size", "32", "--no-progress",
            "--out", str(tmp_path / "run")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    state = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    assert state["config"]["model"]["data_shape"] == [2]
    assert not (tmp_path / "run" / "samples").exists()


def test_cli_conv_on_vectors_names_the_flag(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((40, 3), np.float32))
    args = ["train", "--data", str(tmp_path / "v.npy"), "--arch", "conv", "--steps", "1",
            "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, ConfigError) and "--arch" in str(result.exception)
