"""What a run writes besides its checkpoints: the resolved config, ``metrics.jsonl`` (averaged
loss terms, throughput, evaluations), sample and reconstruction grids, and the live progress
bar."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from aegan_core.files import write_atomic
from aegan_core.images import save_grid
from training.checkpoint import CONFIG_FILE, remove_temp_files
from training.config import RunConfig

log = logging.getLogger("training.training_loop")


# Called on rank 0 after each metrics record: (step, record, ema networks) -> extra fields.
EvalHook = Callable[[int, dict[str, Any], dict[str, nn.Module]], dict[str, Any]]


def write_grids(
    ema: dict[str, nn.Module], fixed_z: torch.Tensor, fixed_x: torch.Tensor, folder: Path, step: int
) -> None:
    """Samples of the EMA generator on fixed noise; real images above their reconstructions."""
    folder.mkdir(parents=True, exist_ok=True)
    for net in ema.values():
        net.eval()
    with torch.no_grad():
        fakes = ema["G"](fixed_z).cpu().numpy()
        save_grid(fakes, str(folder / f"fakes-{step:07d}.png"))
        if "E" in ema:
            recon = ema["G"](ema["E"](fixed_x)).cpu()
            n = min(8, len(fixed_x))
            rows = [
                torch.cat([fixed_x[i : i + n].cpu(), recon[i : i + n]]) for i in range(0, 32, n)
            ]
            save_grid(torch.cat(rows).numpy(), str(folder / f"recon-{step:07d}.png"), nrow=n)
    for net in ema.values():
        net.train()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint we resume from, and a last record cut
    off by a crash in the middle of its write; the history is replaced atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a record cut off mid-write
            continue
        recorded = record.get("step") if isinstance(record, dict) else None
        if isinstance(recorded, int) and recorded <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept).encode())


class MetricsLog:
    """Loss terms summed on the device (no sync per step), averaged into one ``metrics.jsonl``
    record every ``log_every`` steps, with throughput and, on rank 0, the evaluation hook's
    fields."""

    def __init__(
        self, path: Path, cfg: RunConfig, world: int, writer: bool, eval_hook: EvalHook | None
    ) -> None:
        self.path, self.cfg, self.world, self.writer = path, cfg, world, writer
        self.eval_hook = eval_hook
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.run_start = self.interval_start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach()
        self.steps += 1

    def due(self, done: int) -> bool:
        return done % self.cfg.train.log_every == 0 or done == total_steps(self.cfg)

    def write(self, done: int, ema: dict[str, nn.Module]) -> dict[str, Any]:
        """The record of the steps since the last one; appended to the file on rank 0."""
        elapsed = time.perf_counter() - self.interval_start
        losses = {k: float(v) / self.steps for k, v in self.sums.items()}
        if not all(map(_finite, losses.values())):
            raise FloatingPointError(f"non-finite loss at step {done}: {losses}")
        t = self.cfg.train
        record = {
            "step": done,
            "time_s": round(time.perf_counter() - self.run_start, 3),
            "images_per_s": round(t.batch_size * self.world * self.steps / elapsed, 1),
            **losses,
        }
        if self.writer:
            if self.eval_hook is not None:
                record.update(self.eval_hook(done, record, ema))
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.sums, self.steps, self.interval_start = {}, 0, time.perf_counter()
        return record


def prepare_run_dir(run_dir: Path, cfg: RunConfig, start: int) -> None:
    """Rank 0, before the first step: the folder, no leftovers of cut-off writes, the resolved
    config, and a metrics history that ends at the step the run continues from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_temp_files(run_dir)
    if removed:
        log.info("removed %d temporary file(s) of cut-off writes", len(removed))
    write_atomic(run_dir / CONFIG_FILE, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    _truncate_metrics(run_dir / "metrics.jsonl", start)


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar with the live figures (``disable``: nothing is drawn)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        disable=not enabled,
    )


def progress_stats(record: dict[str, Any]) -> str:
    stats = " ".join(
        f"{k.removeprefix('loss/')}={record[k]:.3f}"
        for k in ("loss/Dx/real", "loss/G/adv_x", "loss/GE/recon_x")
        if k in record
    )
    return f"{stats} {record['images_per_s']:.0f} img/s"


def total_steps(cfg: RunConfig) -> int:
    """Joint steps, then the encoder stage's."""
    return cfg.train.steps + cfg.train.encoder_stage_steps
