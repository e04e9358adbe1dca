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
from training.config import ConfigError, DataConfig, RunConfig, fashion_mnist_dir
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
from training.presets import DEFAULT_NUM_SAMPLES

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
    assert test.labels is not None

    def training_split() -> tuple[np.ndarray, np.ndarray]:
        train = load_fashion_mnist(directory, "train")
        assert train.labels is not None
        return train.samples.numpy(), train.labels.numpy()

    return Reference(
        "fmnist",
        test.samples.numpy(),
        f"fashion-mnist:test ({directory})",
        labels=test.labels.numpy(),
        training_split=training_split,
    )


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


def image_folder_reference(
    directory: str, data_shape: tuple[int, ...], data_cfg: dict[str, Any], trained_on: str | None
) -> Reference:
    """Held-out images of a folder, resized to the model's shape. The run's own training folder
    gives its held-out split (``data.held_out`` of the run) and its training split for the PCA
    baseline; another folder is held out whole (the run's folder, if it still exists, gives the
    training images)."""
    from training.data import ImageSplit, load_image_folder

    channels, size = data_shape[0], data_shape[-1]
    on_bad_file = str(data_cfg.get("on_bad_file", "fail"))
    share = data_cfg.get("held_out", 0.0)
    share = float(share) if isinstance(share, int | float) else 0.0
    same = trained_on is not None and Path(directory).resolve() == Path(trained_on).resolve()
    if same and share <= 0:
        raise ConfigError(
            "--data", f"{directory} is the run's training folder and the run held out no images"
        )
    split: ImageSplit = "held-out" if same else "all"
    held = load_image_folder(directory, size, channels, on_bad_file, split, share)

    training_split = None
    if trained_on is not None and Path(trained_on).is_dir():

        def training_split() -> tuple[np.ndarray, None]:
            train_split: ImageSplit = "train" if share > 0 else "all"
            train = load_image_folder(trained_on, size, channels, "skip", train_split, share)
            return train.samples.numpy(), None

    return Reference("images", held.samples.numpy(), held.source, training_split=training_split)


def pick_reference(
    data_shape: tuple[int, ...], config: dict[str, Any], data: str | None, notes: list[str]
) -> Reference | None:
    """Held-out data for the model: ``--data`` if given; else the Fashion-MNIST test split for
    28x28 grey images, the held-out split of the run's image folder, a held-out draw of a
    built-in mixture (``mixture:NAME``), or the run's own .npy file for vectors (it has no
    held-out split). Vector data that declares its modes (a mixture, or an .npy with a
    ``FILE.modes.json``) brings them along for the mode metrics. An image folder (the run's or
    ``--data DIR``) is compared as the user's own images (training/metrics/heldout.py)."""
    from training.mixtures import MIXTURE_PREFIX

    raw_data = config.get("data")
    data_cfg: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    source = data or data_cfg.get("source")
    trained_on = data_cfg.get("source")
    if len(data_shape) == 3 and source and Path(str(source)).is_dir():
        folder = str(trained_on) if trained_on and Path(str(trained_on)).is_dir() else None
        share = data_cfg.get("held_out", 0.0)
        if data is not None or (isinstance(share, int | float) and share > 0):
            return image_folder_reference(str(source), data_shape, data_cfg, folder)
        notes.append(
            f"the run trained on every image of {source} (data.held_out 0, or a run from "
            "before it): pass --data DIR with images it did not train on"
        )
        if tuple(data_shape) != FMNIST_SHAPE:
            return None
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
        notes.append(
            f"images of shape {tuple(data_shape)}: the Fashion-MNIST metrics need 1x28x28, and "
            f"the run's image folder {trained_on!r} is not here (pass --data DIR)"
        )
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
    if reference is not None and reference.kind == "images":
        from training.metrics.heldout import CAVEATS

        ctx.notes.extend(f"{key}: {text}" for key, text in CAVEATS.items() if key in results)
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


# What ``aegan eval`` sets side by side: (measure, the model's key, the PCA baseline's key).
AGAINST_PCA = (
    ("reconstruction PSNR, dB", "recon_psnr", "pca_recon_psnr"),
    ("reconstruction MSE", "recon_mse", "pca_recon_mse"),
    ("10-NN accuracy, Euclidean", "latent_knn_euclidean", "pca_knn_euclidean"),
    ("10-NN accuracy, cosine", "latent_knn_cosine", "pca_knn_cosine"),
    ("linear probe accuracy", "latent_probe", "pca_probe"),
)


def _number(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:d}" if isinstance(value, int) else f"{value:.4g}"


def print_report(report: dict[str, Any], title: str) -> None:
    """The metrics (beside a compared model's, with ``--compare``), then the encoder's
    measures beside a PCA of the latent's size, then the notes."""
    from rich.console import Console
    from rich.table import Table

    meanings = result_meanings()
    other = report.get("compare")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if other is not None:
        table.add_column(f"{other['source']} ({other.get('mode') or 'bundle'})", justify="right")
    table.add_column("meaning")
    keys = list(report["metrics"])
    if other is not None:
        keys += [k for k in other["metrics"] if k not in report["metrics"]]
    for key in keys:
        row = [key, _number(report["metrics"].get(key))]
        if other is not None:
            row.append(_number(other["metrics"].get(key)))
        table.add_row(*row, meanings.get(key, ""))
    console = Console()
    console.print(table)
    pairs = [
        (label, report["metrics"][mine], report["metrics"][pca])
        for label, mine, pca in AGAINST_PCA
        if report["metrics"].get(mine) is not None and report["metrics"].get(pca) is not None
    ]
    if pairs:
        size = report.get("latent_dim", "")
        against = Table(title=f"the encoder against a PCA of the same size ({size} components)")
        against.add_column("measure")
        against.add_column("encoder", justify="right")
        against.add_column(f"PCA-{size} of the pixels", justify="right")
        against.add_column("encoder - PCA", justify="right")
        for label, mine, pca in pairs:
            against.add_row(label, f"{mine:.4g}", f"{pca:.4g}", f"{mine - pca:+.3g}")
        console.print(against)
    for note in report["notes"]:
        console.print(f"note: {note}")
    for note in other["notes"] if other is not None else []:
        if note not in report["notes"]:  # the caveats of both are the same
            console.print(f"note ({other and other['source']}): {note}")


def run_evaluation(
    source: Path,
    metrics: list[str] | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    data: str | None = None,
    threads: int | None = None,
    compare: Path | None = None,
) -> dict[str, Any]:
    """``aegan eval``: measure a run (EMA weights of its newest checkpoint) or an ONNX bundle;
    with ``compare``, a second model (a plain GAN run, say) on the same held-out data, the same
    latent draw and the same metrics, under ``"compare"``. Raises :class:`EvalError` for a model,
    bundle or classifier that cannot be used."""
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
        if compare is not None:
            other, other_info = load_model(Path(compare), threads)
            if other.data_shape != model.data_shape:
                raise EvalError(
                    f"--compare: {compare} makes data of shape {other.data_shape}, "
                    f"{source} of shape {model.data_shape}"
                )
            other_info.pop("config")
            other_report = evaluate(other, reference, metrics, num_samples, seed)
            compared = {"source": str(compare), **other_info, "latent_dim": other.latent_dim}
            report["compare"] = {**compared, **other_report}
            report["compare"].pop("details")
    except (BundleError, ClassifierError) as exc:
        raise EvalError(str(exc)) from exc
    uses_classifier = any(METRICS[k].reference == "fmnist" for k in report["details"]["seconds"])
    return {
        "source": str(source),
        **info,
        "latent_dim": model.latent_dim,
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
    # The latents' k-NN and probe encode all 60 000 training images: kept for ``aegan eval``.
    hook_metrics = [n for n in default_metric_names(reference.kind) if n != "latents"]

    def hook(step: int, record: dict[str, Any], ema: dict[str, Any]) -> dict[str, Any]:
        if step % t.eval_every:
            return {}
        start = time.perf_counter()
        for net in ema.values():
            net.eval()
        try:
            model = torch_model(ema, cfg.model.latent_dim, tuple(cfg.model.data_shape))
            report = evaluate(model, reference, hook_metrics, t.eval_samples, seed=0)
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
