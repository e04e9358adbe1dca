"""SIGKILL training at random moments, resume until done, compare with an uninterrupted run.

Each trial starts a tiny run (`aegan train` on an .npy of random images, in a child process), kills
it with SIGKILL, resumes it with `aegan train --resume RUN` (killing some resumes too) until it
finishes, and compares its final checkpoint with the one of an uninterrupted run of the same
config: every network, the EMA, both optimisers and the RNG states, tensor for tensor, and the loss
records of metrics.jsonl. Kill moments:

- ``time``: a uniformly random time within the training part of a run (measured on the reference
  run from the moment the child has imported everything to its exit), so kills land in data loading,
  network set-up, training steps, grids, metrics and checkpoint writes alike;
- ``write``: inside the write of a checkpoint chosen at random, after half of its bytes reached the
  temporary file (``checkpoints/.tmp-*.pt``) and before it is renamed into place.

Prints a table and writes the trials as JSON (``--json``). Exit status 1 if any trial failed.

    nice -n 10 .venv/bin/python bench/kill_training.py --trials 20 --json bench-kill.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

STEPS = 16  # Steps of the tiny run.
CHECKPOINT_EVERY = 4  # Steps between checkpoints (4 checkpoints, the newest 3 kept).
WRITE_PAUSE_S = 30.0  # How long a `write` trial's child sleeps half-way through a checkpoint.
RUN_TIMEOUT_S = 300.0  # One child process may not take longer than this.
MAX_ATTEMPTS = 8  # Runs per trial before it counts as failed.


def train_args(data: Path, run: Path) -> list[str]:
    """`aegan train` arguments of the tiny run (one thread: deterministic and light on the CPU)."""
    return [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--steps",
        str(STEPS),
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(run),
        "--set",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "--set",
        "train.log_every=2",
        "--set",
        "train.image_every=8",
        "--set",
        "train.deterministic=true",  # compared bit for bit: deterministic kernels on a GPU too
    ]


# --- the child: `aegan` in-process, optionally pausing inside a checkpoint write ------------------


def child(marker: Path, pause_at_write: int, argv: list[str]) -> None:
    """Run ``aegan ARGV``. Appends ``start`` to ``marker`` once everything is imported; with
    ``pause_at_write`` = k > 0, the k-th checkpoint write of this process writes half its bytes,
    appends ``write STEP`` and sleeps, so the parent kills it inside the write."""
    import torch

    import training.checkpoint
    import training.evaluate  # noqa: F401  (imported by the command: keep it out of the timing)
    import training.training_loop  # noqa: F401
    from aegan_cli import run

    if pause_at_write > 0:
        real_save = torch.save
        writes = 0

        def save_with_pause(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            nonlocal writes
            writes += 1
            if writes != pause_at_write:
                real_save(obj, f, *args, **kwargs)
                return
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            with open(marker, "a") as m:
                m.write(f"write {obj['step']}\n")
            time.sleep(WRITE_PAUSE_S)
            f.write(data[len(data) // 2 :])

        training.checkpoint.torch.save = save_with_pause
    with open(marker, "a") as m:
        m.write("start\n")
    sys.argv = ["aegan", *argv]
    run()


# --- the parent ---------------------------------------------------------------------------------


@dataclass
class Attempt:
    kind: str  # fresh | resume
    kill: str  # none | time | write
    kill_after_s: float | None = None  # seconds after the child's `start`
    killed: bool = False  # False: the child exited before the kill moment
    newest_checkpoint_at_kill: int | None = None  # step of the newest checkpoint file then
    temp_files_at_kill: int = 0  # .tmp-* files in checkpoints/ at the kill (a write under way)
    returncode: int | None = None
    error: str = ""


@dataclass
class Trial:
    trial: int
    attempts: list[Attempt] = field(default_factory=list)
    resumes: int = 0
    completed: bool = False
    equal: bool = False
    differences: list[str] = field(default_factory=list)
    leftover_temp_files: int = 0
    missed_kills: int = 0  # runs that ended before the kill moment drawn for them: drawn again
    seconds: float = 0.0


def _checkpoint_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:12]) for p in folder.glob("step-*.pt"))


def _temp_files(run: Path) -> int:
    return len(list(run.glob(".tmp-*"))) + len(list(run.glob("checkpoints/.tmp-*")))


def _marker_lines(marker: Path) -> list[str]:
    return marker.read_text().splitlines() if marker.exists() else []


def run_child(
    argv: list[str], marker: Path, kill: str, delay_s: float, pause_at_write: int
) -> tuple[Attempt, float]:
    """One child process, killed as planned; returns the attempt and its training seconds."""
    marker.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", str(marker)]
    cmd += [str(pause_at_write if kill == "write" else 0), "--", *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    attempt = Attempt(kind="resume" if "--resume" in argv else "fresh", kill=kill)
    run = Path(argv[argv.index("--resume" if "--resume" in argv else "--out") + 1])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    started = None
    while proc.poll() is None and time.monotonic() < deadline:
        lines = _marker_lines(marker)
        if started is None and "start" in lines:
            started = time.monotonic()
        due = (
            kill == "time" and started is not None and time.monotonic() - started >= delay_s
        ) or (kill == "write" and any(line.startswith("write ") for line in lines))
        if due:
            steps = _checkpoint_steps(run)
            attempt.newest_checkpoint_at_kill = steps[-1] if steps else None
            attempt.temp_files_at_kill = len(list(run.glob("checkpoints/.tmp-*")))
            proc.send_signal(signal.SIGKILL)
            attempt.killed = True
            attempt.kill_after_s = round(time.monotonic() - started, 3)
            break
        time.sleep(0.005)
    if proc.poll() is None and not attempt.killed:
        proc.kill()
        attempt.error = f"timed out after {RUN_TIMEOUT_S:.0f} s"
    output = proc.communicate()[0].decode(errors="replace")
    attempt.returncode = proc.returncode
    seconds = time.monotonic() - started if started is not None else 0.0
    if not attempt.killed and proc.returncode != 0 and not attempt.error:
        attempt.error = output.strip().splitlines()[-1] if output.strip() else "no output"
    return attempt, seconds


def final_state(run: Path) -> dict[str, Any]:
    from training.checkpoint import load_checkpoint

    path = run / "checkpoints" / f"step-{STEPS:07d}.pt"
    state = load_checkpoint(path)
    return {k: state[k] for k in ("step", "nets", "ema", "optim", "rng")}


def loss_records(run: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("loss/")} for r in records]


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths at which two checkpoint states differ (tensors compared exactly)."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{where}/{i}")
        ]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    return [] if a == b else [where]


def run_trial(
    number: int, rng: random.Random, data: Path, work: Path, reference: Path, window: list[float]
) -> Trial:
    """One trial; ``window[0]``: the training seconds kill moments are drawn from, shortened
    whenever a run ends before its kill (the machine's load changes)."""
    trial = Trial(trial=number)
    run = work / f"trial-{number:02d}"
    marker = work / f"trial-{number:02d}.marker"
    start = time.monotonic()
    # Every third trial is killed inside a checkpoint write; some trials are killed twice.
    plan = ["write"] if number % 3 == 2 else ["time"]
    if rng.random() < 0.3:
        plan.append("time")
    while len(trial.attempts) < MAX_ATTEMPTS:
        kill = plan[len(trial.attempts)] if len(trial.attempts) < len(plan) else "none"
        resume = (run / "config.json").exists()
        argv = ["train", "--resume", str(run)] if resume else train_args(data, run)
        pause_at = rng.randint(1, STEPS // CHECKPOINT_EVERY)
        attempt, seconds = run_child(argv, marker, kill, rng.uniform(0.0, window[0]), pause_at)
        if kill != "none" and not attempt.killed and attempt.returncode == 0 and not resume:
            trial.missed_kills += 1  # finished before its kill: start over, in a shorter window
            window[0] = min(window[0], seconds)
            if trial.missed_kills < 4:
                shutil.rmtree(run, ignore_errors=True)
                continue
        trial.attempts.append(attempt)
        trial.resumes += resume
        if attempt.error:
            break
        if not attempt.killed and attempt.returncode == 0:
            trial.completed = True
            break
    trial.seconds = round(time.monotonic() - start, 1)
    if trial.completed:
        trial.differences = differences(final_state(reference), final_state(run))
        if loss_records(reference) != loss_records(run):
            trial.differences.append("metrics.jsonl loss records")
        trial.equal = not trial.differences
        trial.leftover_temp_files = _temp_files(run)
    marker.unlink(missing_ok=True)
    shutil.rmtree(run, ignore_errors=True)
    return trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--json", type=Path, default=None, help="write the trials here")
    args = parser.parse_args(argv)

    import numpy as np

    rng = random.Random(args.seed)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aegan-kill-") as tmp:
        work = Path(tmp)
        data = work / "images.npy"
        np.save(data, np.random.default_rng(0).uniform(0, 1, (64, 1, 28, 28)).astype(np.float32))
        reference = work / "reference"
        attempt, train_s = run_child(train_args(data, reference), work / "ref.marker", "none", 0, 0)
        if attempt.returncode != 0:
            print(f"reference run failed: {attempt.error}", file=sys.stderr)
            return 2
        print(f"reference run: {STEPS} steps, {train_s:.1f} s after start-up", flush=True)
        trials, window = [], [train_s]
        for number in range(args.trials):
            trial = run_trial(number, rng, data, work, reference, window)
            trials.append(trial)
            print(_row(trial), flush=True)
    total_s = time.monotonic() - began
    summary = {
        "trials": len(trials),
        "kills": sum(a.killed for t in trials for a in t.attempts),
        "kills_in_checkpoint_write": sum(
            a.killed and a.kill == "write" for t in trials for a in t.attempts
        ),
        "resumes": sum(t.resumes for t in trials),
        "missed_kills": sum(t.missed_kills for t in trials),
        "completed": sum(t.completed for t in trials),
        "equal": sum(t.equal for t in trials),
        "leftover_temp_files": sum(t.leftover_temp_files for t in trials),
        "reference_train_s": round(train_s, 2),
        "total_s": round(total_s, 1),
        "steps": STEPS,
        "checkpoint_every": CHECKPOINT_EVERY,
        "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
    }
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        report = {"summary": summary, "trials": [asdict(t) for t in trials]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = summary["equal"] == summary["trials"] and summary["leftover_temp_files"] == 0
    return 0 if ok else 1


def _row(trial: Trial) -> str:
    kills = ", ".join(
        f"{a.kill}@{a.kill_after_s:.2f}s"
        f"(ckpt {a.newest_checkpoint_at_kill}, tmp {a.temp_files_at_kill})"
        for a in trial.attempts
        if a.killed
    )
    errors = "; ".join(a.error for a in trial.attempts if a.error)
    return (
        f"trial {trial.trial:2d}  kills: {kills or '-':60s}  resumes {trial.resumes}  "
        f"{'equal' if trial.equal else 'DIFFERENT' if trial.completed else 'FAILED'}  "
        f"{trial.seconds:5.1f} s  {errors} {', '.join(trial.differences[:3])}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[5:])
    else:
        sys.exit(main())
