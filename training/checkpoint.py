"""Checkpoints: everything a run needs to resume or be exported, written atomically.

A checkpoint is one ``torch.save`` file of plain containers and tensors (loadable with
``weights_only=True``): all networks, the EMA of G and E, both optimisers, the step, the RNG states
and the resolved config. A run keeps the newest ``keep`` of them in ``RUN_DIR/checkpoints/``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from aegan_core.errors import UserError
from aegan_core.files import TEMP_PREFIX, replace_file
from training.config import RunConfig

log = logging.getLogger(__name__)

FORMAT = "aegan-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"  # The resolved config of a run, written before its first step.
_NAME = re.compile(r"^step-(\d{7,})\.pt$")


class CheckpointError(UserError, ValueError):
    """A file is missing, truncated, or not an AEGAN checkpoint; the message names it."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict[str, Any], run_dir: Path, keep: int) -> Path:
    """Write ``state`` for its step atomically (temp file, fsync, rename) and prune old ones."""
    path = checkpoint_path(run_dir, int(state["step"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, lambda f: torch.save({"format": FORMAT, **state}, f), suffix=".pt")
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes a crash cut short (``.tmp-*`` in the run directory and
    its checkpoints); only the run's one writer may call this. Returns what was removed."""
    run_dir = Path(run_dir)
    stale = [*run_dir.glob(f"{TEMP_PREFIX}*"), *(run_dir / CHECKPOINT_DIR).glob(f"{TEMP_PREFIX}*")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check one checkpoint file (``weights_only=True``: no code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an AEGAN checkpoint (no {FORMAT!r} marker)")
    for key in ("step", "config", "nets", "ema"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return state


def resolve_checkpoint(source: Path) -> Path:
    """A checkpoint file as given, or the newest loadable checkpoint of a run directory."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint file or run directory")
    for path in reversed(list_checkpoints(source)):
        try:
            load_checkpoint(path)
            return path
        except CheckpointError as exc:
            log.warning("skipping unloadable checkpoint: %s", exc)
    raise CheckpointError(f"{source}: run directory holds no loadable checkpoint")


def resume_point(run_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(state of the run's newest loadable checkpoint, the run's config as a dict). A run stopped
    before its first checkpoint has no state (None): it starts again from step 0 with the config
    it saved in ``config.json``, as it began."""
    run_dir = Path(run_dir)
    config = run_dir / CONFIG_FILE
    if run_dir.is_dir() and not list_checkpoints(run_dir) and config.is_file():
        try:
            raw = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config}: the run's config cannot be read ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{config}: the run's config is not a JSON object")
        return None, raw
    state = load_checkpoint(resolve_checkpoint(run_dir))
    return state, state["config"]


def run_config(raw: Any, source: Path | str) -> RunConfig:
    """The typed config a run or checkpoint recorded; :class:`CheckpointError` naming ``source``
    when it cannot be read (unknown fields, wrong types)."""
    if (
        isinstance(raw, dict)
        and isinstance(raw.get("data"), dict)
        and "held_out" not in raw["data"]
    ):
        # Runs from before data.held_out trained on every image of a folder: resume them so.
        raw = {**raw, "data": {**raw["data"], "held_out": 0.0}}
    try:
        return RunConfig.from_dict(raw)
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{source}: the run's config cannot be read ({exc})") from exc
