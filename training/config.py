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
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from aegan_core.errors import UserError
from training.presets import PRESETS

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "AEGAN_FASHION_MNIST_DIR"

Arch = Literal["conv", "mlp"]
Mode = Literal["aegan", "gan"]
OnBadFile = Literal["fail", "skip"]
Precision = Literal["fp32", "bf16", "fp16"]
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


# Bounds declared on a field (the names and attributes of annotated_types', which costs `aegan
# --help` a third of its start-up to import; these are checked by validate() alone). Plain
# classes: a dataclass costs more to create at import than these are worth.
class Ge:
    def __init__(self, ge: float) -> None:
        self.ge = ge  # the value must be >= ge


class Gt:
    def __init__(self, gt: float) -> None:
        self.gt = gt  # > gt


class Le:
    def __init__(self, le: float) -> None:
        self.le = le  # <= le


class Lt:
    def __init__(self, lt: float) -> None:
        self.lt = lt  # < lt


class Matches:
    """A field's declared form: the whole value matches ``pattern`` (``meaning``: the same in
    words)."""

    def __init__(self, pattern: str, meaning: str) -> None:
        self.pattern, self.meaning = pattern, meaning


# Declared bounds of numeric fields, checked by validate() for every field.
Count = Annotated[int, Ge(1)]  # at least 1
Every = Annotated[int, Ge(0)]  # an interval in steps; 0: off (or only at the end)
Weight = Annotated[float, Ge(0)]  # a loss weight or a noise level
Fraction = Annotated[float, Ge(0), Le(1)]  # in [0, 1]
Rate = Annotated[float, Gt(0)]  # a learning rate
Beta = Annotated[float, Ge(0), Lt(1)]  # an Adam beta
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
    channels: Literal[1, 3] = 1  # Channels of image-folder data: 1 (grey) or 3 (RGB).
    on_bad_file: OnBadFile = (
        "fail"  # Image folders: 'fail' on an unreadable image, or 'skip' and report.
    )
    limit: Count | None = None  # Use only the first N samples (quick runs and tests); None: all.
    # Image folders: share of the images kept out of training, for ``aegan eval``'s held-out
    # reconstruction and sample quality. An image is held out by the SHA-256 of its path in the
    # folder (training/data.py ``is_held_out``): deterministic, so eval finds the same split.
    held_out: Annotated[float, Ge(0), Lt(1)] = 0.1


@dataclass
class ModelConfig:
    arch: Arch = "conv"  # Network family: 'conv' (DCGAN-like, images) or 'mlp' (vectors, flat).
    latent_dim: Count = 32  # Dimension of z; prior N(0, I).
    width: Count = 32  # conv: channels of the widest-resolution layer; mlp: ignored.
    hidden: Count = 256  # mlp: units per hidden layer; conv: units of the latent discriminator.
    depth: Count = 3  # mlp: hidden layers per network; conv: ignored.
    data_shape: list[int] = field(default_factory=list)  # (C, H, W) or (D,); filled from the data.


@dataclass
class LossConfig:
    mode: Mode = "aegan"  # 'aegan' (G, E, Dx, Dz, reconstruction terms) or 'gan' (G and Dx only).
    # Image defaults tuned on Fashion-MNIST at 10 000 steps against the GAN (docs/RESULTS.md).
    adv_x: Weight = 3.0  # Weight of the image adversarial terms for G(z) and G(E(x)) (aegan only).
    # The reconstructions' share of the image adversarial game: Dx calls G(E(x)) fake (as one fake
    # kind of two, weighted adv_x_recon / (1 + adv_x_recon)) and G+E make it pass as real (weight
    # adv_x * adv_x_recon). 1 is Lazarou's AEGAN; 0 leaves Dx to real against G(z), skips its pass
    # on G(E(x)), and keeps G(E(x)) only in the reconstruction term.
    adv_x_recon: Weight = 1.0
    adv_z: Weight = 3.0  # Weight of the latent adversarial terms for E(x) and E(G(z)).
    recon_x: Weight = 5.0  # Weight of the image reconstruction ||G(E(x)) - x||_1 (mean per pixel).
    recon_z: Weight = 2.0  # Weight of the latent reconstruction ||E(G(z)) - z||_2^2 (mean per dim).
    recon_x_final: Fraction = 0.2  # recon_x weight at the last step, as a fraction (linear anneal).
    # Share of each batch reconstructed through G(E(x)) (the first samples; every sample still
    # passes E for the latent terms). Below 1 the second pass of G, an AEGAN step's largest extra
    # cost, shrinks with it.
    recon_share: Annotated[float, Gt(0), Le(1)] = 1.0
    # Std of Gaussian noise added to each encoding (E(x) and E(G(z))): a stochastic encoder, whose
    # encodings of tight clusters can fill the prior. 0: E is deterministic.
    encoder_noise: Weight = 0.0
    # Reconstruct inside G's own batch: one G pass over [z; E(x)] concatenated, so G(z) and
    # G(E(x)) share batch-norm statistics and a step costs one G pass fewer (E(G(z)) then waits
    # for that pass, a second E call). False: separate G calls per input kind.
    recon_in_g_batch: bool = False
    instance_noise: Weight = 0.0  # Std of Gaussian noise added to Dx inputs at step 0, decayed.


@dataclass
class OptimConfig:
    lr_g: Rate = 2e-4  # Adam learning rate of G and E (one optimiser, one backward).
    lr_d: Rate = 2e-4  # Adam learning rate of Dx and Dz.
    beta1: Beta = 0.5  # Adam beta1 (DCGAN's choice).
    beta2: Beta = 0.999  # Adam beta2.
    lr_final: Fraction = 1.0  # Both learning rates at the last step, as a fraction (linear anneal).
    lr_encoder_stage: Rate = 2e-4  # Adam learning rate of E in the encoder stage (constant).


@dataclass
class TrainConfig:
    steps: Count = 8000  # Optimiser steps (one D step and one G+E step each).
    batch_size: Annotated[int, Ge(2)] = 64  # Samples per step per process.
    seed: int = 0  # Seeds initialisation, data order and noise; ranks add their rank.
    ema_halflife: Annotated[float, Gt(0)] = 500.0  # Half-life of the EMA of G and E, in steps.
    log_every: Count = 50  # Steps between metrics.jsonl records.
    image_every: Every = 500  # Steps between sample and reconstruction grids (0: only at the end).
    checkpoint_every: Every = 1000  # Steps between checkpoints (0: only at the end).
    keep_checkpoints: Count = 3  # Newest checkpoints kept on disk.
    grid_size: Count = 64  # Images in each sample grid (fixed noise).
    eval_every: Every = 0  # Steps between sample-quality evaluations (0: off; Fashion-MNIST only).
    eval_samples: Annotated[int, Ge(10)] = 2000  # Generated samples per periodic evaluation.
    threads: Count | None = None  # torch intra-op threads; None: torch's default.
    # Encoder stage, after the ``steps`` joint steps (aegan only; 0: none): this many more steps
    # train E alone against the frozen EMA generator (batch norm in eval mode): image
    # reconstruction at the full weight recon_x (no anneal: G's samples cannot change), latent
    # reconstruction E(G(z)) ~ z (recon_z), and the latent adversarial terms against Dz (adv_z),
    # which trains on, so the codes stay on the prior. FD of the samples is unchanged by it.
    encoder_stage_steps: Every = 0
    # Batches (of batch_size) over which the EMA networks' batch-norm statistics are recomputed
    # before each checkpoint and periodic evaluation (G on prior draws, E on training data, from
    # a generator seeded by the run's seed alone); 0: the EMA keeps the live networks' statistics.
    bn_recompute_batches: Every = 0
    progress: bool = True  # Show a live progress bar.
    # Where to train: 'auto' (CUDA when torch sees a GPU for every local rank, else the CPU),
    # 'cpu', 'cuda' (under torchrun each rank takes GPU LOCAL_RANK) or 'cuda:N' (one process).
    device: Annotated[str, Matches(DEVICE_PATTERN, "auto, cpu, cuda or cuda:N")] = "auto"
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


# The command-line flags of `aegan train` that set a config field; every other field is set with
# ``--set SECTION.FIELD=VALUE``. Messages name the flag a user would type.
CLI_FLAGS = {
    ("data", "source"): "--data",
    ("data", "image_size"): "--image-size",
    ("data", "channels"): "--channels",
    ("data", "on_bad_file"): "--on-bad-file",
    ("data", "limit"): "--limit",
    ("data", "fashion_mnist_dir"): "--fashion-mnist-dir",
    ("model", "arch"): "--arch",
    ("model", "latent_dim"): "--latent-dim",
    ("model", "width"): "--width",
    ("loss", "mode"): "--mode",
    ("train", "steps"): "--steps",
    ("train", "encoder_stage_steps"): "--encoder-stage-steps",
    ("train", "batch_size"): "--batch-size",
    ("train", "seed"): "--seed",
    ("train", "threads"): "--threads",
    ("train", "device"): "--device",
}
SECTIONS = ("data", "model", "loss", "optim", "train")


def flag_of(section: str, name: str) -> str:
    """The flag that sets ``section.name``: its own, or the ``--set`` key."""
    return CLI_FLAGS.get((section, name), f"{section}.{name}")


def declared_problem(value: Any, annotation: Any) -> str | None:
    """What is wrong with ``value`` against the declarations of its field's ``annotation`` (a
    Literal's choices, annotated_types bounds, a :class:`Matches` form), or None. None passes
    an optional field."""
    if value is None:
        return None
    extras: tuple[Any, ...] = ()
    if get_origin(annotation) is Annotated:
        annotation, *rest = get_args(annotation)
        extras = tuple(rest)
    for option in (
        get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    ):
        if get_origin(option) is Annotated:  # Count | None: the bounds are on the option
            return declared_problem(value, option)
    if get_origin(annotation) is Literal and value not in get_args(annotation):
        return f"must be {describe_type(annotation)}, not {value!r}"
    low = next((b for b in extras if isinstance(b, Ge | Gt)), None)
    high = next((b for b in extras if isinstance(b, Le | Lt)), None)
    inside = (
        (low is None or (value >= low.ge if isinstance(low, Ge) else value > low.gt))
        and (high is None or (value <= high.le if isinstance(high, Le) else value < high.lt))
    )  # fmt: skip
    if not inside:
        return f"must be {_range(low, high)}, not {value}"
    for form in extras:
        if isinstance(form, Matches) and not re.fullmatch(form.pattern, value):
            return f"must be {form.meaning}, not {value!r}"
    return None


def _range(low: Ge | Gt | None, high: Le | Lt | None) -> str:
    if high is None:
        assert low is not None
        return f"at least {low.ge}" if isinstance(low, Ge) else f"above {low.gt}"
    lower = "[" + str(low.ge) if isinstance(low, Ge) else "(" + str(getattr(low, "gt", "-inf"))
    upper = str(high.le) + "]" if isinstance(high, Le) else str(high.lt) + ")"
    return f"in {lower}, {upper}"


def validate(cfg: RunConfig, data: DataFacts | None = None) -> RunConfig:
    """All sanity checks, in one place: every field against what its declaration allows (choices,
    bounds, form: declared on the field, above), then the checks across fields and, once the data
    is loaded, whether it suits them. Raises :class:`ConfigError` naming the flag to fix."""
    for section in SECTIONS:
        target = getattr(cfg, section)
        hints = get_type_hints(type(target), include_extras=True)
        for f in fields(target):
            problem = declared_problem(getattr(target, f.name), hints[f.name])
            if problem is not None:
                raise ConfigError(flag_of(section, f.name), problem)
    d, m, lo, t = cfg.data, cfg.model, cfg.loss, cfg.train
    if m.arch == "conv" and d.image_size not in CONV_IMAGE_SIZES:
        raise ConfigError("--image-size", f"conv networks take {_sizes()} px, not {d.image_size}")
    if d.source == "fashion-mnist" and (d.image_size, d.channels) != (28, 1):
        raise ConfigError("--image-size", "Fashion-MNIST is 28x28 grey: use --image-size 28")
    if t.eval_every % t.log_every:
        raise ConfigError("train.eval_every", "must be a multiple of train.log_every")
    if t.encoder_stage_steps > 0 and lo.mode != "aegan":
        raise ConfigError("--encoder-stage-steps", "the encoder stage needs --mode aegan")
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
