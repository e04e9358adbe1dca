"""Checkpoint -> verified model bundle (the format is defined in :mod:`aegan_core.bundle`).

:func:`export_bundle` rebuilds G and E from the checkpoint's own config, loads their EMA weights,
exports both graphs (and their fp16 variants), checks each against PyTorch with ONNX Runtime,
writes the manifest, adds the latent directions (export/directions.py: PCA of the encoder's latents
of the training data), re-reads the bundle the way the service will, and only then moves it into
place. All of this happens in a temporary directory beside ``out``: a failed export leaves nothing
behind.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import onnxscript
import torch
from torch import nn

from aegan_core.bundle import (
    DATA_TENSOR,
    DIRECTIONS_KEY,
    ENCODER,
    ENCODER_FP16,
    FILE_NAMES,
    FORMAT_VERSION,
    GENERATOR,
    GENERATOR_FP16,
    LATENT_TENSOR,
    MANIFEST_NAME,
    Manifest,
    file_entry,
    load_bundle,
    write_manifest,
)
from aegan_core.files import fsync_dir
from export.directions import add_directions, training_samples
from export.onnx_export import (
    EXAMPLE_BATCH,
    EXPORTER,
    OPSET,
    PARITY_BATCHES,
    ExportError,
    check_fp16,
    check_fp32,
    export_graph,
    probe_inputs,
    to_fp16,
    torch_outputs,
)
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    run_config,
)
from training.config import RunConfig
from training.data import DataError
from training.networks import build_networks

log = logging.getLogger(__name__)

LATENT_PRIOR = "normal(0, I)"
PIXEL_RANGE = [-1.0, 1.0]
NORMALISATION = "x = pixel / 127.5 - 1"
EVAL_FILE = "eval.json"  # evaluation results a run directory may hold; merged into the metrics


def load_ema_networks(checkpoint: Path) -> tuple[dict[str, Any], RunConfig, nn.Module, nn.Module]:
    """(checkpoint state, its config, EMA generator, EMA encoder), networks in eval mode.

    Raises :class:`CheckpointError` for unreadable or foreign files and :class:`ExportError` for
    a ``mode=gan`` run, which has no encoder.
    """
    state = load_checkpoint(checkpoint)
    cfg = run_config(state["config"], checkpoint)
    if cfg.loss.mode != "aegan" or "E" not in state["ema"]:
        raise ExportError(
            f"{checkpoint}: a mode={cfg.loss.mode} run has no encoder, and a bundle needs both "
            f"{FILE_NAMES[GENERATOR]} and {FILE_NAMES[ENCODER]}; export a mode=aegan run"
        )
    nets = build_networks(cfg.model, cfg.loss.mode)
    for key in ("G", "E"):
        try:
            nets[key].load_state_dict(state["ema"][key])
        except RuntimeError as exc:
            raise CheckpointError(
                f"{checkpoint}: EMA {key} does not fit its config: {exc}"
            ) from exc
        nets[key].eval()
    return state, cfg, nets["G"], nets["E"]


def export_bundle(
    source: Path,
    out: Path,
    *,
    name: str | None = None,
    fp16: bool = True,
    metrics: dict[str, Any] | None = None,
    bentoml_name: str | None = None,
    force: bool = False,
) -> Path:
    """Export the EMA G and E of ``source`` (a run directory: its newest loadable checkpoint; or a
    checkpoint file) into the bundle directory ``out`` and return ``out``.

    ``name`` defaults to the run directory's name. ``metrics`` are merged over the run's
    ``eval.json`` (if any); either may be an ``aegan eval`` report or a flat object of metrics.
    ``fp16`` adds the float16 graphs. ``bentoml_name`` also saves the bundle into the BentoML
    model store. An existing ``out`` is replaced only with ``force``.
    """
    source, out = Path(source), Path(out)
    _check_destination(out, force)
    if bentoml_name is not None:
        _check_bentoml_name(bentoml_name)
    checkpoint = resolve_checkpoint(source)
    state, cfg, generator, encoder = load_ema_networks(checkpoint)
    run_dir = _run_dir(source, checkpoint)
    merged_metrics, evaluation = _collect_metrics(run_dir, metrics, int(state["step"]))

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        files, parity = _write_graphs(work, cfg, generator, encoder, fp16)
        kind = _kind(cfg)
        image = {"pixel_range": PIXEL_RANGE, "normalisation": NORMALISATION}
        manifest = Manifest.model_validate(
            {
                "format_version": FORMAT_VERSION,
                "name": name or _default_name(run_dir, checkpoint),
                "kind": kind,
                "arch": cfg.model.arch,
                "data_shape": cfg.model.data_shape,
                "latent_dim": cfg.model.latent_dim,
                "latent_prior": LATENT_PRIOR,
                "files": files,
                "opset": OPSET,
                "exporter": EXPORTER,
                "versions": {
                    "torch": torch.__version__,
                    "onnx": onnx.__version__,
                    "onnxscript": onnxscript.__version__,
                    "onnxruntime": ort.__version__,
                },
                "parity": parity,
                "metrics": merged_metrics,
                "evaluation": evaluation,
                "training_config": state["config"],
                "step": int(state["step"]),
                "source_checkpoint": checkpoint.name,
                "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
                **(image if kind == "image" else {}),
            }
        )
        write_manifest(work, manifest)
        _add_directions(work, cfg)
        load_bundle(work)  # read back and hash-check exactly as the service will
        fsync_dir(work, files=True)
        _move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("exported %s (step %d) to %s", checkpoint, state["step"], out)
    if bentoml_name is not None:
        tag = store_in_bentoml(out, bentoml_name)
        log.info("saved %s in the BentoML model store as %s", out, tag)
    return out


# --- graphs ---------------------------------------------------------------------------------


def _write_graphs(
    folder: Path, cfg: RunConfig, generator: nn.Module, encoder: nn.Module, fp16: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export, check and save G and E (and their fp16 variants).

    Returns (manifest ``files`` entries, parity records)."""
    kind = _kind(cfg)
    latents, data = probe_inputs(generator, cfg.model.latent_dim, kind)
    graphs = {
        # role: (network, example input, input name, output name, parity inputs)
        GENERATOR: (generator, latents[-1][:EXAMPLE_BATCH], LATENT_TENSOR, DATA_TENSOR, latents),
        ENCODER: (encoder, data[-1][:EXAMPLE_BATCH], DATA_TENSOR, LATENT_TENSOR, data),
    }
    files: dict[str, Any] = {}
    parity: dict[str, Any] = {"batches": list(PARITY_BATCHES)}
    for role, (net, example, input_name, output_name, inputs) in graphs.items():
        refs = torch_outputs(net, inputs)
        model = export_graph(net, torch.from_numpy(example), input_name, output_name, role)
        parity[role] = check_fp32(model, FILE_NAMES[role], input_name, inputs, refs).to_json()
        onnx.save(model, folder / FILE_NAMES[role])
        files[role] = file_entry(folder, role, input_name, output_name)
        if fp16:
            half_role = {GENERATOR: GENERATOR_FP16, ENCODER: ENCODER_FP16}[role]
            half = to_fp16(model)
            result = check_fp16(half, FILE_NAMES[half_role], input_name, inputs, refs)
            parity[half_role] = result.to_json()
            onnx.save(half, folder / FILE_NAMES[half_role])
            files[half_role] = file_entry(folder, half_role, input_name, output_name)
    return files, parity


def _add_directions(folder: Path, cfg: RunConfig) -> None:
    """Latent directions from the run's training data (export/directions.py). Without the data
    the bundle is still complete: the explorer page then uses random directions."""
    try:
        samples, data = training_samples(cfg.data)
    except DataError as exc:
        log.warning(
            "the bundle gets no latent directions: the training data cannot be read (%s); add "
            "them later with `aegan directions BUNDLE --data ...`",
            exc,
        )
        return
    add_directions(folder, samples, data)


def _kind(cfg: RunConfig) -> str:
    return "image" if len(cfg.model.data_shape) == 3 else "vector"


# --- sources, names and metrics -------------------------------------------------------------


def _run_dir(source: Path, checkpoint: Path) -> Path | None:
    """The run directory the checkpoint belongs to, if it sits in one."""
    if source.is_dir():
        return source
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return None


def _default_name(run_dir: Path | None, checkpoint: Path) -> str:
    return run_dir.resolve().name if run_dir is not None else checkpoint.stem


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read metrics ({exc})") from exc
    if not isinstance(value, dict):
        raise ExportError(f"{path}: metrics must be a JSON object")
    return value


def read_metrics_file(path: Path) -> dict[str, Any]:
    """A JSON object of metrics (``--metrics-json``); :class:`ExportError` names a bad file."""
    return _read_json_object(Path(path))


def _collect_metrics(
    run_dir: Path | None, metrics: dict[str, Any] | None, step: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's ``eval.json`` (if any) with ``metrics`` merged over it; and, per source, where it
    came from and the context of its measurement (step, samples, seed, ... of an ``aegan eval``
    report)."""
    merged: dict[str, Any] = {}
    evaluation: list[dict[str, Any]] = []
    found = []
    if run_dir is not None and (run_dir / EVAL_FILE).is_file():
        found.append((str(run_dir / EVAL_FILE), _read_json_object(run_dir / EVAL_FILE)))
    if metrics:
        found.append(("given to export", metrics))
    for origin, report in found:
        values, context = _split_report(report)
        if context.get("step", step) != step:
            log.warning(
                "metrics from %s were measured at step %s; exporting step %d",
                origin,
                context["step"],
                step,
            )
        merged.update(values)
        evaluation.append({"from": origin, **context})
    return merged, evaluation


def _split_report(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, context) of an ``aegan eval`` report (``{"metrics": {...}, "step": ...}``; its
    bulky ``details`` are dropped), or of a flat object of metrics (no context)."""
    if isinstance(report.get("metrics"), dict):
        context = {k: v for k, v in report.items() if k not in ("metrics", "details")}
        return dict(report["metrics"]), context
    return dict(report), {}


# --- putting the bundle in place ------------------------------------------------------------


def _check_destination(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``; even then, replace only a bundle (a directory
    holding a manifest) or an empty directory, never an arbitrary folder."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ExportError(f"--out {out} already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"--out {out} is not a directory; refusing to replace it")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ExportError(
            f"--out {out} is not a model bundle (no {MANIFEST_NAME}); not replacing it"
        )


def _move_into_place(work: Path, out: Path) -> None:
    """Rename the finished bundle to ``out``. An old ``out`` is swapped with it in one atomic step
    where the system can (Linux): ``out`` holds a whole bundle, old or new, at every moment.
    Elsewhere the old one is moved aside first, restored if the final rename fails, removed last."""
    if not out.exists():
        os.rename(work, out)
        fsync_dir(out.parent)
        return
    if _exchange(work, out):  # now ``out`` is the new bundle and ``work`` the old one
        fsync_dir(out.parent)
        shutil.rmtree(work, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(work, out)
    except BaseException as exc:
        try:
            os.rename(old, out)
        except OSError as undo:
            raise ExportError(
                f"--out {out}: the new bundle could not be moved into place ({exc}) nor the "
                f"previous one restored ({undo}); the previous bundle is in {old}"
            ) from exc
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``). False where the
    C library, kernel or file system cannot; any other failure raises ``OSError``."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # C library older than glibc 2.28, or not glibc
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


# --- BentoML model store --------------------------------------------------------------------


def _check_bentoml_name(name: str) -> None:
    import bentoml

    try:
        bentoml.Tag.from_taglike(name)
    except ValueError as exc:
        raise ExportError(f"--bentoml-name {name!r} is not a valid BentoML tag: {exc}") from exc


def store_in_bentoml(bundle_dir: Path, name: str) -> str:
    """Copy a (verified) bundle into the BentoML model store as ``name``; return the model tag.

    A service loads it back with ``load_bundle(bentoml.models.get(tag).path)``.
    """
    import bentoml

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    labels = {"kind": bundle.kind, "bundle_format": str(manifest["format_version"])}
    metadata = _bentoml_metadata(
        {
            "bundle_name": bundle.name,
            "kind": bundle.kind,
            "data_shape": list(bundle.data_shape),
            "latent_dim": bundle.latent_dim,
            "latent_prior": manifest["latent_prior"],
            "opset": manifest["opset"],
            "step": manifest.get("step"),
            "sha256": {role: entry["sha256"] for role, entry in manifest["files"].items()},
            "metrics": bundle.metrics,
        }
    )
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        target = Path(model.path)
        names = [MANIFEST_NAME, *(e["path"] for e in manifest["files"].values())]
        if DIRECTIONS_KEY in manifest:
            names.append(manifest[DIRECTIONS_KEY]["path"])
        for file_name in names:
            shutil.copy2(bundle_dir / file_name, target / file_name)
        load_bundle(target)  # the copy is what a service will read: check it too
    return str(model.tag)


def _bentoml_metadata(value: Any) -> Any:
    """Metadata BentoML accepts: JSON-like values without None."""
    if isinstance(value, dict):
        return {str(k): _bentoml_metadata(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_bentoml_metadata(v) for v in value if v is not None]
    return value
