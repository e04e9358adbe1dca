"""Typed run configuration: one dataclass per concern, named presets as data, and one sanity check.

The CLI builds a :class:`RunConfig` from a preset plus flags, calls :func:`validate` once (it fails
fast and names the offending flag), and then plain values flow inward. The resolved config is saved
beside the checkpoints and inside each of them, so export and resume need no flags.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from aegan_core.errors import UserError

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_NUM_SAMPLES = 10_000  # samples ``aegan eval`` generates and compares
FASHION_MNIST_ENV = "AEGAN_FASHION_MNIST_DIR"

Arch = Literal["conv", "mlp"]
Mode = Literal["aegan", "gan"]
OnBadFile = Literal["fail", "skip"]
Precision = Literal["fp32", "bf16", "fp16"]
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
CONV_IMAGE_SIZES = (28, 32, 64)  # square sides the conv networks are built for


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # 'fashion-mnist', an image folder, an .npy, or 'mixture:NAME'.
    fashion_mnist_dir: str | None = (
        None  # IDX .gz directory; None: $AEGAN_FASHION_MNIST_DIR or Debian's.
    )
    image_size: int = (
        28  # Side in pixels that image folders are resized to (28, 32 or 64 for conv).
    )
    channels: int = 1  # Channels of image-folder data: 1 (grey) or 3 (RGB).
    on_bad_file: OnBadFile = (
        "fail"  # Image folders: 'fail' on an unreadable image, or 'skip' and report.
    )
    limit: int | None = None  # Use only the first N samples (quick runs and tests); None: all.
    # Image folders: share of the images kept out of training, for ``aegan eval``'s held-out
    # reconstruction and sample quality. An image is held out by the SHA-256 of its path in the
    # folder (training/data.py ``is_held_out``): deterministic, so eval finds the same split.
    held_out: float = 0.1


@dataclass
class ModelConfig:
    arch: Arch = "conv"  # Network family: 'conv' (DCGAN-like, images) or 'mlp' (vectors, flat).
    latent_dim: int = 32  # Dimension of z; prior N(0, I).
    width: int = 32  # conv: channels of the widest-resolution layer; mlp: ignored.
    hidden: int = 256  # mlp: units per hidden layer; conv: units of the latent discriminator.
    depth: int = 3  # mlp: hidden layers per network; conv: ignored.
    data_shape: list[int] = field(default_factory=list)  # (C, H, W) or (D,); filled from the data.


@dataclass
class LossConfig:
    mode: Mode = "aegan"  # 'aegan' (G, E, Dx, Dz, reconstruction terms) or 'gan' (G and Dx only).
    # Image defaults tuned on Fashion-MNIST at 10 000 steps against the GAN (docs/RESULTS.md).
    adv_x: float = 3.0  # Weight of the image adversarial terms for G(z) and G(E(x)) (aegan only).
    # The reconstructions' share of the image adversarial game: Dx calls G(E(x)) fake (as one fake
    # kind of two, weighted adv_x_recon / (1 + adv_x_recon)) and G+E make it pass as real (weight
    # adv_x * adv_x_recon). 1 is Lazarou's AEGAN; 0 leaves Dx to real against G(z), skips its pass
    # on G(E(x)), and keeps G(E(x)) only in the reconstruction term.
    adv_x_recon: float = 1.0
    adv_z: float = 3.0  # Weight of the latent adversarial terms for E(x) and E(G(z)).
    recon_x: float = 5.0  # Weight of the image reconstruction ||G(E(x)) - x||_1 (mean per pixel).
    recon_z: float = 2.0  # Weight of the latent reconstruction ||E(G(z)) - z||_2^2 (mean per dim).
    recon_x_final: float = 0.2  # recon_x weight at the last step, as a fraction (linear anneal).
    # Share of each batch reconstructed through G(E(x)) (the first samples; every sample still
    # passes E for the latent terms). Below 1 the second pass of G, an AEGAN step's largest extra
    # cost, shrinks with it.
    recon_share: float = 1.0
    # Std of Gaussian noise added to each encoding (E(x) and E(G(z))): a stochastic encoder, whose
    # encodings of tight clusters can fill the prior. 0: E is deterministic.
    encoder_noise: float = 0.0
    # Reconstruct inside G's own batch: one G pass over [z; E(x)] concatenated, so G(z) and
    # G(E(x)) share batch-norm statistics and a step costs one G pass fewer (E(G(z)) then waits
    # for that pass, a second E call). False: separate G calls per input kind.
    recon_in_g_batch: bool = False
    instance_noise: float = 0.0  # Std of Gaussian noise added to Dx inputs at step 0, decayed to 0.


@dataclass
class OptimConfig:
    lr_g: float = 2e-4  # Adam learning rate of G and E (one optimiser, one backward).
    lr_d: float = 2e-4  # Adam learning rate of Dx and Dz.
    beta1: float = 0.5  # Adam beta1 (DCGAN's choice).
    beta2: float = 0.999  # Adam beta2.
    lr_final: float = 1.0  # Both learning rates at the last step, as a fraction (linear anneal).
    lr_encoder_stage: float = 2e-4  # Adam learning rate of E in the encoder stage (constant).


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
    # Encoder stage, after the ``steps`` joint steps (aegan only; 0: none): this many more steps
    # train E alone against the frozen EMA generator (batch norm in eval mode): image
    # reconstruction at the full weight recon_x (no anneal: G's samples cannot change), latent
    # reconstruction E(G(z)) ~ z (recon_z), and the latent adversarial terms against Dz (adv_z),
    # which trains on, so the codes stay on the prior. FD of the samples is unchanged by it.
    encoder_stage_steps: int = 0
    # Batches (of batch_size) over which the EMA networks' batch-norm statistics are recomputed
    # before each checkpoint and periodic evaluation (G on prior draws, E on training data, from
    # a generator seeded by the run's seed alone); 0: the EMA keeps the live networks' statistics.
    bn_recompute_batches: int = 0
    progress: bool = True  # Show a live progress bar.
    # Where to train: 'auto' (CUDA when torch sees a GPU for every local rank, else the CPU),
    # 'cpu', 'cuda' (under torchrun each rank takes GPU LOCAL_RANK) or 'cuda:N' (one process).
    device: str = "auto"
    # Bit-exact runs and resumes on CUDA: deterministic kernels (torch.use_deterministic_algorithms,
    # cuDNN's deterministic algorithms, CUBLAS_WORKSPACE_CONFIG); slower. The CPU is deterministic
    # without it.
    deterministic: bool = False
    cudnn_benchmark: bool = False  # CUDA: let cuDNN time its algorithms for the fixed batch shape.
    # Autocast of the forward passes: 'fp32' (off), 'bf16' (CUDA since Ampere, or the CPU), or
    # 'fp16' (CUDA; gradients scaled by a GradScaler, whose state the checkpoints keep).
    precision: Precision = "fp32"
    # CUDA: copy the whole dataset to the GPU once (batches are gathered there); false: each batch
    # is gathered on the CPU, pinned and copied without blocking.
    data_on_device: bool = True


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


def _from_dict(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise TypeError(f"{where}: expected an object, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    hints = get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        if is_dataclass(hints[name]):
            values[name] = _from_dict(hints[name], value, f"{where}.{name}")
        else:
            values[name] = check_type(value, hints[name], f"{where}.{name}")
    return cls(**values)


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """``value`` if it has the field type ``annotation`` (an integer is taken for a float), else a
    TypeError naming ``where`` and the expected type."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin in (Union, types.UnionType):
        for option in args:
            try:
                return check_type(value, option, where)
            except TypeError:
                pass
    elif origin is list:
        if isinstance(value, list):
            return [check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif annotation is type(None):
        if value is None:
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    raise TypeError(f"{where}: expected {describe_type(annotation)}, got {value!r}")


def describe_type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is list:
        return f"a list of {describe_type(args[0])}"
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}
    return "null" if annotation is type(None) else names.get(annotation, str(annotation))


def apply_assignment(cfg: RunConfig, assignment: str) -> None:
    """``--set SECTION.FIELD=VALUE``: VALUE is read as JSON (a bare word as a string) and must have
    the field's type; otherwise a :class:`ConfigError` names the flag and the expected type."""
    key, sep, raw = assignment.partition("=")
    section, dot, name = key.partition(".")
    target = getattr(cfg, section, None)
    if not sep or not dot or not is_dataclass(target) or name not in target.__dataclass_fields__:
        raise ConfigError("--set", f"{assignment!r} is not SECTION.FIELD=VALUE of a known field")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    annotation = get_type_hints(type(target))[name]
    try:
        value = check_type(value, annotation, key)
    except TypeError as exc:
        try:  # a string field takes the text as it is ("--set data.source=2024")
            value = check_type(raw, annotation, key)
        except TypeError:
            expected = describe_type(annotation)
            raise ConfigError("--set", f"{key}: expected {expected}, got {raw!r}") from exc
    setattr(target, name, value)


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
    # (bench/vectors.py, docs/RESULTS.md): about 8 CPU minutes per run there. Six hidden layers
    # per network and 12 000 steps: a deeper G, trained longer, turns sharper between modes, so
    # fewer samples fall between them. The reconstructions stay out of the image adversarial game
    # (adv_x_recon 0); the encoder is stochastic (encoder_noise), so the codes of tight modes fill
    # the prior; the reconstruction weight is high because the L1 term is a mean over coordinates
    # (diluted in 100-D); both learning rates anneal to 5 %, which sharpens the samples.
    "vectors-mlp": {
        "model": {"arch": "mlp", "latent_dim": 2, "hidden": 128, "depth": 6},
        "loss": {
            "adv_x": 3.0,
            "adv_x_recon": 0.0,
            "adv_z": 1.0,
            "recon_x": 30.0,
            "recon_z": 0.2,
            "recon_x_final": 1.0,
            "encoder_noise": 0.2,
        },
        "optim": {"lr_g": 1e-3, "lr_d": 1e-3, "lr_final": 0.05},
        "train": {"steps": 12000, "batch_size": 256, "image_every": 0},
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


class ConfigError(UserError, ValueError):
    """A setting is invalid; ``flag`` names the command-line flag (or config field) to fix."""

    usage = True

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def fashion_mnist_dir(data: DataConfig) -> str:
    return data.fashion_mnist_dir or os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR


@dataclass(frozen=True)
class DataFacts:
    """What the loaded data is, for the checks that need it."""

    kind: Literal["image", "vector"]
    shape: tuple[int, ...]  # (C, H, W) or (D,)
    count: int
    source: str


def validate(cfg: RunConfig, data: DataFacts | None = None) -> RunConfig:
    """All sanity checks, in one place: the flags' values (types and enumerations are checked when
    they are set) and, once the data is loaded, whether it suits them. Raises :class:`ConfigError`
    naming the flag to fix."""
    d, m, lo, o, t = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train
    for flag, value, kind in (
        ("--arch", m.arch, Arch),
        ("--mode", lo.mode, Mode),
        ("--on-bad-file", d.on_bad_file, OnBadFile),
    ):
        if value not in get_args(kind):
            raise ConfigError(flag, f"must be {describe_type(kind)}, not {value!r}")
    if d.channels not in (1, 3):
        raise ConfigError("--channels", f"must be 1 or 3, not {d.channels}")
    if m.arch == "conv" and d.image_size not in CONV_IMAGE_SIZES:
        raise ConfigError("--image-size", f"conv networks take {_sizes()} px, not {d.image_size}")
    if d.source == "fashion-mnist" and (d.image_size, d.channels) != (28, 1):
        raise ConfigError("--image-size", "Fashion-MNIST is 28x28 grey: use --image-size 28")
    if not 0 <= d.held_out < 1:
        raise ConfigError("data.held_out", f"must be a fraction in [0, 1), not {d.held_out}")
    if d.limit is not None and d.limit < 1:
        raise ConfigError("--limit", "must be at least 1")
    for name, value in (("--latent-dim", m.latent_dim), ("--width", m.width)):
        if value < 1:
            raise ConfigError(name, f"must be at least 1, not {value}")
    for name, value in (("model.hidden", m.hidden), ("model.depth", m.depth)):
        if value < 1:
            raise ConfigError(name, f"must be at least 1, not {value}")
    nonnegative = ("adv_x", "adv_x_recon", "adv_z", "recon_x", "recon_z", "encoder_noise")
    for name in (*nonnegative, "instance_noise"):
        if getattr(lo, name) < 0:
            raise ConfigError(f"loss.{name}", "must be non-negative")
    if not 0 < lo.recon_share <= 1:
        raise ConfigError("loss.recon_share", "must be a fraction in (0, 1]")
    if not 0 <= lo.recon_x_final <= 1:
        raise ConfigError("loss.recon_x_final", "must be a fraction in [0, 1]")
    for name, value in (("optim.lr_g", o.lr_g), ("optim.lr_d", o.lr_d)):
        if value <= 0:
            raise ConfigError(name, f"must be positive, not {value}")
    if not 0 <= o.lr_final <= 1:
        raise ConfigError("optim.lr_final", "must be a fraction in [0, 1]")
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
    if t.encoder_stage_steps < 0:
        raise ConfigError("train.encoder_stage_steps", "must be >= 0")
    if t.encoder_stage_steps > 0 and lo.mode != "aegan":
        raise ConfigError("train.encoder_stage_steps", "the encoder stage needs --mode aegan")
    if o.lr_encoder_stage <= 0:
        raise ConfigError("optim.lr_encoder_stage", "must be positive")
    if t.bn_recompute_batches < 0:
        raise ConfigError("train.bn_recompute_batches", "must be >= 0")
    if t.threads is not None and t.threads < 1:
        raise ConfigError("--threads", "must be at least 1")
    if not re.fullmatch(DEVICE_PATTERN, t.device):
        raise ConfigError("--device", f"must be auto, cpu, cuda or cuda:N, not {t.device!r}")
    if t.precision not in get_args(Precision):
        raise ConfigError("train.precision", f"must be {describe_type(Precision)}")
    if t.deterministic and t.cudnn_benchmark:
        raise ConfigError(
            "train.cudnn_benchmark", "cuDNN's benchmark picks kernels by timing: not deterministic"
        )
    if data is not None:
        _validate_data(cfg, data)
    return cfg


def _validate_data(cfg: RunConfig, data: DataFacts) -> None:
    if cfg.model.arch == "conv" and data.kind != "image":
        raise ConfigError("--arch", f"conv networks need images; {data.source} holds vectors")
    if data.kind == "image" and cfg.model.arch == "conv":
        _, h, w = data.shape
        if h != w or h not in CONV_IMAGE_SIZES:
            raise ConfigError(
                "--arch", f"conv networks take square {_sizes()} px images, not {h}x{w}"
            )
    if cfg.model.data_shape and tuple(cfg.model.data_shape) != data.shape:
        raise ConfigError(
            "--data", f"data shape {data.shape} differs from the run's {cfg.model.data_shape}"
        )
    if data.count < cfg.train.batch_size:
        raise ConfigError("--batch-size", f"{data.source} has only {data.count} samples")


def _sizes() -> str:
    return ", ".join(map(str, CONV_IMAGE_SIZES[:-1])) + f" or {CONV_IMAGE_SIZES[-1]}"
