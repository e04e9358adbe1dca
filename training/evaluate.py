"""``aegan eval``: sample-quality metrics of a run (EMA weights of its newest checkpoint) or of an
ONNX model bundle, and the periodic evaluation hook of the training loop.

Images of Fashion-MNIST shape are compared with the Fashion-MNIST test split in the features of the
project's own classifier (FD-FMNIST, precision, recall, class coverage) and reconstructed through
the autoencoder (MSE, PSNR). Vector data is compared with held-out vectors (energy distance), and
scored on mode coverage when it declares its modes (``training/metrics/modes.py``).
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from aegan_core.errors import UserError
from training.config import (
    DEFAULT_NUM_SAMPLES,
    ConfigError,
    DataConfig,
    RunConfig,
    fashion_mnist_dir,
)
from training.metrics import (
    METRICS,
    EvalContext,
    GenerativeModel,
    Reference,
    compute_metrics,
    default_metric_names,
    result_meanings,
)
from training.metrics.registry import FMNIST_SHAPE

log = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"  # metrics.jsonl fields written by the training-time hook


class EvalError(UserError, ValueError):
    """The model, bundle or classifier of an evaluation cannot be used."""


# --- models: torch networks or ONNX graphs, behind one numpy interface ------------------------


def torch_model(
    nets: dict[str, Any], latent_dim: int, data_shape: tuple[int, ...]
) -> GenerativeModel:
    """Wrap G (and E) torch modules, already in eval mode, as numpy functions."""
    import torch

    device = next(nets["G"].parameters()).device

    def run(net: Any) -> Any:
        @torch.no_grad()
        def call(batch: np.ndarray) -> np.ndarray:
            return (
                net(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).float().cpu().numpy()
            )

        return call

    encode = run(nets["E"]) if "E" in nets else None
    return GenerativeModel(run(nets["G"]), encode, latent_dim, tuple(data_shape))


def load_run_model(source: Path) -> tuple[GenerativeModel, dict[str, Any]]:
    """EMA G (and E) of a checkpoint file, or of the newest loadable checkpoint of a run."""
    from training.checkpoint import load_checkpoint, resolve_checkpoint, run_config
    from training.networks import build_networks

    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    cfg = run_config(state["config"], path)
    nets = build_networks(cfg.model, cfg.loss.mode)
    ema = {k: nets[k] for k in ("G", "E") if k in state["ema"]}
    for k, net in ema.items():
        net.load_state_dict(state["ema"][k])
        net.eval()
    model = torch_model(ema, cfg.model.latent_dim, tuple(cfg.model.data_shape))
    info = {"checkpoint": str(path), "step": int(state["step"]), "mode": cfg.loss.mode}
    return model, {**info, "config": state["config"]}


def load_bundle_model(
    path: Path, threads: int | None = None
) -> tuple[GenerativeModel, dict[str, Any]]:
    """The generator and encoder graphs of a bundle, run on the CPU by the service's runtime."""
    from aegan_core.bundle import load_bundle
    from aegan_core.runtime import ModelRuntime

    bundle = load_bundle(path)
    runtime = ModelRuntime(bundle, device="cpu", threads=threads or 0)  # 0: ONNX Runtime's default
    manifest = bundle.manifest  # written by export: "training_config" and "step" of the checkpoint
    model = GenerativeModel(runtime.generate, runtime.encode, bundle.latent_dim, bundle.data_shape)
    config = manifest.get("training_config")
    step = manifest.get("step")
    info = {"bundle": str(bundle.path), "name": bundle.name, "step": step}
    return model, {**info, "config": config if isinstance(config, dict) else {}}


def load_model(source: Path, threads: int | None = None) -> tuple[GenerativeModel, dict[str, Any]]:
    from aegan_core.bundle import MANIFEST_NAME

    if source.is_dir() and (source / MANIFEST_NAME).is_file():
        return load_bundle_model(source, threads)
    return load_run_model(source)


# --- reference data -------------------------------------------------------------------------


@lru_cache(maxsize=2)
def fmnist_reference(directory: str) -> Reference:
    """The Fashion-MNIST test split (cached: the training hook reuses its features)."""
    from training.data import load_fashion_mnist

    test = load_fashion_mnist(directory, "test")
    return Reference("fmnist", test.samples.numpy(), f"fashion-mnist:test ({directory})")


def vector_reference(path: str) -> Reference:
    """An .npy of vectors, with the modes its sidecar ``FILE.modes.json`` declares, if any."""
    from training.data import DataError, load_npy
    from training.mixtures import read_sidecar

    data = load_npy(path)
    if data.kind != "vector":
        raise ConfigError("--data", f"{path} holds images, not N x D vectors")
    try:
        modes = read_sidecar(path)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    if modes is not None and modes.dim != data.shape[0]:
        raise DataError(f"{path}: vectors of {data.shape[0]} dims, its modes are {modes.dim}-D")
    return Reference("vector", data.samples.numpy(), path, modes=modes)


def mixture_reference(source: str) -> Reference:
    """A built-in mixture's held-out draw (another seed than its training draw), with its modes."""
    from training.data import load_mixture
    from training.mixtures import HELD_OUT_SEED, get_mixture

    data = load_mixture(source, "held-out")
    name = f"{source} (held-out draw, seed {HELD_OUT_SEED})"
    return Reference("vector", data.samples.numpy(), name, modes=get_mixture(source))


def pick_reference(
    data_shape: tuple[int, ...], config: dict[str, Any], data: str | None, notes: list[str]
) -> Reference | None:
    """Held-out data for the model: ``--data`` if given; else the Fashion-MNIST test split for
    28x28 grey images, a held-out draw of a built-in mixture (``mixture:NAME``), or the run's own
    .npy file for vectors (it has no held-out split). Vector data that declares its modes (a
    mixture, or an .npy with a ``FILE.modes.json``) brings them along for the mode metrics."""
    from training.mixtures import MIXTURE_PREFIX

    data_cfg = config.get("data") if isinstance(config.get("data"), dict) else {}
    source = data or data_cfg.get("source")
    if len(data_shape) == 1:
        if source and str(source).startswith(MIXTURE_PREFIX):
            return mixture_reference(str(source))
        if source and str(source).endswith(".npy") and Path(source).is_file():
            if data is None:
                notes.append(
                    f"vectors compared with the training file {source} (no held-out split)"
                )
            return vector_reference(str(source))
        notes.append("no held-out vectors found: pass --data FILE.npy")
        return None
    if tuple(data_shape) != FMNIST_SHAPE:
        notes.append(f"images of shape {tuple(data_shape)}: the Fashion-MNIST metrics need 1x28x28")
        return None
    if source not in (None, "fashion-mnist"):
        notes.append(f"trained on {source}, compared with Fashion-MNIST's test split")
    directory = fashion_mnist_dir(DataConfig(fashion_mnist_dir=data_cfg.get("fashion_mnist_dir")))
    return fmnist_reference(directory)


# --- evaluation -----------------------------------------------------------------------------


def evaluate(
    model: GenerativeModel,
    reference: Reference | None,
    metrics: list[str] | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Compute the metrics; returns ``{"metrics", "details", "notes", "num_samples", "seed"}``."""
    ctx = EvalContext(model, reference, num_samples, seed)
    ctx.notes.extend(notes or [])
    names = metrics or default_metric_names(reference.kind if reference else None)
    results = compute_metrics(ctx, names)
    return {
        "metrics": {k: _json_number(v) for k, v in results.items()},
        "details": ctx.details,
        "notes": ctx.notes,
        "num_samples": num_samples,
        "seed": seed,
        "reference": reference.source if reference else None,
    }


def _json_number(value: float) -> float | int | None:
    """numpy scalars -> JSON numbers; counts stay integers; a value that is not finite (a reverse KL
    with no high-quality sample) is null, which JSON can carry."""
    if isinstance(value, int | np.integer):
        return int(value)
    return float(value) if np.isfinite(value) else None


def classifier_record() -> dict[str, Any]:
    from training.metrics.classifier import classifier_info

    info = classifier_info()
    keys = ("weights", "sha256", "test_accuracy", "command")
    return {k: info[k] for k in keys if k in info}


def print_report(report: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    meanings = result_meanings()
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    for key, value in report["metrics"].items():
        text = "—" if value is None else f"{value:d}" if isinstance(value, int) else f"{value:.4g}"
        table.add_row(key, text, meanings.get(key, ""))
    console = Console()
    console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}")


def run_evaluation(
    source: Path,
    metrics: list[str] | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    data: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """``aegan eval``: measure a run (EMA weights of its newest checkpoint) or an ONNX bundle.
    Raises :class:`EvalError` for a model, bundle or classifier that cannot be used."""
    import torch

    from aegan_core.bundle import BundleError
    from training.metrics.classifier import ClassifierError

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        model, info = load_model(Path(source), threads)
        notes: list[str] = []
        reference = pick_reference(model.data_shape, info.pop("config"), data, notes)
        report = evaluate(model, reference, metrics, num_samples, seed, notes)
    except (BundleError, ClassifierError) as exc:
        raise EvalError(str(exc)) from exc
    uses_classifier = any(METRICS[k].reference == "fmnist" for k in report["details"]["seconds"])
    return {
        "source": str(source),
        **info,
        **report,
        "classifier": classifier_record() if uses_classifier else None,
        "seconds": round(time.perf_counter() - start, 1),
    }


# --- during training ------------------------------------------------------------------------


def make_eval_hook(cfg: RunConfig) -> Any:
    """The training loop's hook: every ``train.eval_every`` steps, the metrics that apply to the
    EMA networks on ``train.eval_samples`` samples, logged as ``eval/<key>`` with ``eval/seconds``.
    None when periodic evaluation is off or the data is not Fashion-MNIST."""
    t = cfg.train
    if t.eval_every <= 0 or cfg.data.source != "fashion-mnist":
        return None
    reference = fmnist_reference(fashion_mnist_dir(cfg.data))

    def hook(step: int, record: dict[str, Any], ema: dict[str, Any]) -> dict[str, Any]:
        if step % t.eval_every:
            return {}
        start = time.perf_counter()
        for net in ema.values():
            net.eval()
        try:
            model = torch_model(ema, cfg.model.latent_dim, tuple(cfg.model.data_shape))
            report = evaluate(model, reference, None, t.eval_samples, seed=0)
        finally:
            for net in ema.values():
                net.train()
        fields = {f"{EVAL_PREFIX}{k}": v for k, v in report["metrics"].items()}
        return {**fields, f"{EVAL_PREFIX}seconds": round(time.perf_counter() - start, 3)}

    return hook


def eval_hook_for_run(run_dir: Path) -> Any:
    """The hook of a run being resumed, from the config it resumes with."""
    from training.checkpoint import resume_point, run_config

    _, raw_config = resume_point(run_dir)
    return make_eval_hook(run_config(raw_config, run_dir))
