"""Typed run configuration: one dataclass per concern, named presets as data, and one sanity check.

The CLI builds a :class:`RunConfig` from a preset plus flags, calls :func:`validate` once (it fails
fast and names the offending flag), and then plain values flow inward. The resolved config is saved
beside the checkpoints and inside each of them, so export and resume need no flags.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "AEGAN_FASHION_MNIST_DIR"


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # 'fashion-mnist', a folder of images, or an .npy file.
    fashion_mnist_dir: str | None = (
        None  # IDX .gz directory; None: $AEGAN_FASHION_MNIST_DIR or Debian's.
    )
    image_size: int = (
        28  # Side in pixels that image folders are resized to (28, 32 or 64 for conv).
    )
    channels: int = 1  # Channels of image-folder data: 1 (grey) or 3 (RGB).
    on_bad_file: str = "fail"  # Image folders: 'fail' on an unreadable image, or 'skip' and report.
    limit: int | None = None  # Use only the first N samples (quick runs and tests); None: all.


@dataclass
class ModelConfig:
    arch: str = (
        "conv"  # Network family: 'conv' (DCGAN-like, images) or 'mlp' (vectors, flat images).
    )
    latent_dim: int = 32  # Dimension of z; prior N(0, I).
    width: int = 32  # conv: channels of the widest-resolution layer; mlp: ignored.
    hidden: int = 256  # mlp: units per hidden layer; conv: units of the latent discriminator.
    depth: int = 3  # mlp: hidden layers per network; conv: ignored.
    data_shape: list[int] = field(default_factory=list)  # (C, H, W) or (D,); filled from the data.


@dataclass
class LossConfig:
    mode: str = "aegan"  # 'aegan' (G, E, Dx, Dz, reconstruction terms) or 'gan' (G and Dx only).
    # Image defaults tuned on Fashion-MNIST at 10 000 steps against the GAN (docs/RESULTS.md).
    adv_x: float = 3.0  # Weight of the image adversarial terms for G(z) and G(E(x)) (aegan only).
    adv_z: float = 3.0  # Weight of the latent adversarial terms for E(x) and E(G(z)).
    recon_x: float = 5.0  # Weight of the image reconstruction ||G(E(x)) - x||_1 (mean per pixel).
    recon_z: float = 2.0  # Weight of the latent reconstruction ||E(G(z)) - z||_2^2 (mean per dim).
    recon_x_final: float = 0.2  # recon_x weight at the last step, as a fraction (linear anneal).
    instance_noise: float = 0.0  # Std of Gaussian noise added to Dx inputs at step 0, decayed to 0.


@dataclass
class OptimConfig:
    lr_g: float = 2e-4  # Adam learning rate of G and E (one optimiser, one backward).
    lr_d: float = 2e-4  # Adam learning rate of Dx and Dz.
    beta1: float = 0.5  # Adam beta1 (DCGAN's choice).
    beta2: float = 0.999  # Adam beta2.


@dataclass
class TrainConfig:
    steps: int = 8000  # Optimiser steps (one D step and one G+E step each).
    batch_size: int = 64  # Samples per step per process.
    seed: int = 0  # Seeds initialisation, data order and noise; ranks add their rank.
    ema_halflife: float = 500.0  # Half-life of the EMA of G and E weights, in steps.
    log_every: int = 50  # Steps between metrics.jsonl records.
    image_every: int = 500  # Steps between sample and reconstruction grids (0: only at the end).
    checkpoint_every: int = 1000  # Steps between checkpoints (0: only at the end).
    keep_checkpoints: int = 3  # Newest checkpoints kept on disk.
    grid_size: int = 64  # Images in each sample grid (fixed noise).
    eval_every: int = 0  # Steps between sample-quality evaluations (0: off; Fashion-MNIST only).
    eval_samples: int = 2000  # Generated samples per periodic evaluation.
    threads: int | None = None  # torch intra-op threads; None: torch's default.
    progress: bool = True  # Show a live progress bar.


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None  # Name of the preset this config started from.

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are rejected by name."""
        return _from_dict(cls, raw, "config")


def _from_dict(cls: type, raw: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    values = {}
    for name, value in raw.items():
        default = known[name].default_factory if callable(known[name].default_factory) else None
        sample = default() if default is not None else None
        if sample is not None and is_dataclass(sample):
            values[name] = _from_dict(type(sample), value, f"{where}.{name}")
        else:
            values[name] = value
    return cls(**values)


# Named presets: overrides applied to the defaults above. Presets are data.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The shipped default: Fashion-MNIST on a 2-core CPU in about an hour.
    "fmnist-cpu": {
        "data": {"source": "fashion-mnist"},
        "model": {"arch": "conv", "latent_dim": 32, "width": 32},
        "train": {"steps": 10000, "batch_size": 64},
    },
    # The same recipe, larger, for a GPU (its loss weights were tuned at the CPU preset's size).
    "fmnist-gpu": {
        "data": {"source": "fashion-mnist"},
        "model": {"arch": "conv", "latent_dim": 64, "width": 64},
        "train": {"steps": 50000, "batch_size": 128, "checkpoint_every": 5000},
    },
    # N x D vector data (--data FILE.npy or mixture:NAME), dense networks as in the original
    # AEGAN. Tuned against the GAN at equal wall-clock on the mixtures of training/mixtures.py
    # (bench/vectors.py, docs/RESULTS.md): 38-48 CPU seconds per run there.
    "vectors-mlp": {
        "model": {"arch": "mlp", "latent_dim": 2, "hidden": 128, "depth": 3},
        "loss": {
            "adv_x": 3.0,
            "adv_z": 1.0,
            "recon_x": 1.0,
            "recon_z": 0.2,
            "recon_x_final": 1.0,
        },
        "optim": {"lr_g": 1e-3, "lr_d": 1e-3},
        "train": {"steps": 2000, "batch_size": 256, "image_every": 0},
    },
    # A few seconds on a CPU: smoke tests and demos.
    "tiny": {
        "data": {"source": "fashion-mnist", "limit": 512},
        "model": {"arch": "conv", "latent_dim": 8, "width": 8, "hidden": 32},
        "train": {
            "steps": 20,
            "batch_size": 16,
            "log_every": 5,
            "image_every": 10,
            "checkpoint_every": 10,
            "grid_size": 16,
        },
    },
}
DEFAULT_PRESET = "fmnist-cpu"


def from_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError("--preset", f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = RunConfig(preset=name)
    for section, overrides in copy.deepcopy(PRESETS[name]).items():
        target = getattr(cfg, section)
        for key, value in overrides.items():
            setattr(target, key, value)
    return cfg


class ConfigError(ValueError):
    """A setting is invalid; ``flag`` names the command-line flag (or config field) to fix."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def fashion_mnist_dir(data: DataConfig) -> str:
    return data.fashion_mnist_dir or os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR


def validate(cfg: RunConfig) -> RunConfig:
    """All cross-field sanity checks, in one place. Raises :class:`ConfigError` naming the flag."""
    d, m, lo, o, t = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train
    if m.arch not in ("conv", "mlp"):
        raise ConfigError("--arch", f"must be 'conv' or 'mlp', not {m.arch!r}")
    if lo.mode not in ("aegan", "gan"):
        raise ConfigError("--mode", f"must be 'aegan' or 'gan', not {lo.mode!r}")
    if d.on_bad_file not in ("fail", "skip"):
        raise ConfigError("--on-bad-file", f"must be 'fail' or 'skip', not {d.on_bad_file!r}")
    if d.channels not in (1, 3):
        raise ConfigError("--channels", f"must be 1 or 3, not {d.channels}")
    if m.arch == "conv" and d.image_size not in (28, 32, 64):
        raise ConfigError("--image-size", f"conv networks take 28, 32 or 64 px, not {d.image_size}")
    if d.source == "fashion-mnist" and (d.image_size, d.channels) != (28, 1):
        raise ConfigError("--image-size", "Fashion-MNIST is 28x28 grey: use --image-size 28")
    if d.limit is not None and d.limit < 1:
        raise ConfigError("--limit", "must be at least 1")
    for name, value in (("--latent-dim", m.latent_dim), ("--width", m.width)):
        if value < 1:
            raise ConfigError(name, f"must be at least 1, not {value}")
    if m.hidden < 1 or m.depth < 1:
        raise ConfigError("--hidden", "hidden units and depth must be at least 1")
    for name in ("adv_x", "adv_z", "recon_x", "recon_z", "instance_noise"):
        if getattr(lo, name) < 0:
            raise ConfigError(f"loss.{name}", "must be non-negative")
    if not 0 <= lo.recon_x_final <= 1:
        raise ConfigError("loss.recon_x_final", "must be a fraction in [0, 1]")
    if o.lr_g <= 0 or o.lr_d <= 0:
        raise ConfigError("--lr", "learning rates must be positive")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        raise ConfigError("optim.beta1", "Adam betas must be in [0, 1)")
    if t.steps < 1:
        raise ConfigError("--steps", f"must be at least 1, not {t.steps}")
    if t.batch_size < 2:
        raise ConfigError("--batch-size", f"must be at least 2, not {t.batch_size}")
    if t.ema_halflife <= 0:
        raise ConfigError("train.ema_halflife", "must be positive")
    if min(t.log_every, t.keep_checkpoints, t.grid_size) < 1:
        raise ConfigError("train.log_every", "log_every, keep_checkpoints, grid_size must be >= 1")
    if t.image_every < 0 or t.checkpoint_every < 0:
        raise ConfigError("train.checkpoint_every", "intervals must be >= 0 (0: only at the end)")
    if t.eval_every < 0 or t.eval_every % t.log_every:
        raise ConfigError("train.eval_every", "must be >= 0 and a multiple of train.log_every")
    if t.eval_samples < 10:
        raise ConfigError("train.eval_samples", "must be at least 10")
    if t.threads is not None and t.threads < 1:
        raise ConfigError("--threads", "must be at least 1")
    return cfg
