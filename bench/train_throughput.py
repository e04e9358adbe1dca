"""Training throughput (images/s) of the `aegan` and `gan` modes on this machine.

Runs the real training loop (preset fmnist-cpu unless --preset says otherwise) for a few steps per
mode, alternating modes over repeats so both see the same machine conditions, and reports the median
images/s of each and their ratio. Usage:

    python bench/train_throughput.py --steps 60 --repeats 2 --threads 2 --out docs/bench-train.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import click
import torch

from training.config import from_preset, validate
from training.training_loop import train


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def measure(preset: str, mode: str, steps: int, threads: int) -> float:
    cfg = from_preset(preset)
    cfg.loss.mode = mode
    cfg.train.steps = steps
    cfg.train.log_every = 10
    cfg.train.image_every = 0
    cfg.train.checkpoint_every = 0
    cfg.train.progress = False
    cfg.train.threads = threads
    validate(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, Path(run_dir))
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines][1:]  # the first interval includes warm-up
    return statistics.median(r["images_per_s"] for r in records)


@click.command()
@click.option("--preset", default="fmnist-cpu")
@click.option("--steps", default=60, help="Steps per measurement (first 10 are warm-up).")
@click.option("--repeats", default=2)
@click.option("--threads", default=2)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write results JSON.")
def main(preset: str, steps: int, repeats: int, threads: int, out: Path | None) -> None:
    results: dict[str, list[float]] = {"aegan": [], "gan": []}
    for _ in range(repeats):
        for mode in results:
            results[mode].append(measure(preset, mode, steps, threads))
    summary = {
        "machine": machine(),
        "preset": preset,
        "steps": steps,
        "repeats": repeats,
        "threads": threads,
        "images_per_s": {m: round(statistics.median(v), 1) for m, v in results.items()},
        "runs": results,
    }
    ips = summary["images_per_s"]
    summary["gan_over_aegan"] = round(ips["gan"] / ips["aegan"], 2)
    click.echo(json.dumps(summary, indent=2))
    if out:
        out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
