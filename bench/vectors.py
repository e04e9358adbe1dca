"""AEGAN against the plain GAN on the mixtures of Gaussians, at equal wall-clock time.

For each mixture of the suite (``training/mixtures.py``) both modes train from the
``vectors-mlp`` preset (``--set`` overrides apply to both; a GAN ignores the AEGAN loss weights)
on ``--data mixture:NAME``, one torch thread per run, 3 seeds each. The AEGAN runs the preset's
steps; the GAN runs as many more as an AEGAN step costs GAN steps on that mixture, measured at the
start of the run (the median over nine rounds of the ratio of ``--timing-steps`` steps of each,
timed back to back), so both get the same wall-clock seconds (``--gan-steps N`` names the GAN's
steps instead, with no timing: equal steps, say). Each final EMA generator is then scored by
``aegan eval``'s own code on 2 500 samples (as VEEGAN and PacGAN count): modes captured, share of
high-quality samples, reverse KL of the mode histogram, energy distance to a held-out draw.

    nice -n 10 python bench/vectors.py --jobs 2 --out docs/vectors
    nice -n 10 python bench/vectors.py --mixtures ring8 --seeds 0 --set loss.adv_x=2 --out runs/x

Runs live in ``--runs`` (default ``runs/vectors``); a run with an ``eval.json`` is not redone
unless ``--fresh``. Writes ``summary.json`` and ``table.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from training.config import RunConfig, from_preset, validate
from training.evaluate import evaluate, load_model, pick_reference
from training.mixtures import SUITE
from training.training_loop import train

sys.path.insert(0, str(Path(__file__).parent))
from step_cost import Trainer, _median_ms  # noqa: E402
from train_throughput import machine  # noqa: E402

PRESET = "vectors-mlp"
EVAL_SAMPLES = 2500  # as VEEGAN and PacGAN count modes
SEEDS = (0, 1, 2)
MODES = ("aegan", "gan")


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def make_config(
    mixture: str, mode: str, seed: int, steps: int | None, sets: list[str]
) -> RunConfig:
    cfg = from_preset(PRESET)
    cfg.data.source = f"mixture:{mixture}"
    for assignment in sets:
        key, value = assignment.split("=", 1)
        section, field = key.split(".", 1)
        setattr(getattr(cfg, section), field, _parse(value))
    cfg.loss.mode = mode
    cfg.train.seed = seed
    if steps is not None:
        cfg.train.steps = steps
    cfg.train.threads = 1
    cfg.train.progress = False
    cfg.train.checkpoint_every = 0
    cfg.train.log_every = min(cfg.train.log_every, cfg.train.steps)
    return validate(cfg)


TIMING_ROUNDS = 9


def step_ratio(mixture: str, sets: list[str], timing_steps: int) -> float:
    """AEGAN step seconds over GAN step seconds on this mixture: the median, over rounds, of the
    ratio of the two modes' median steps timed back to back (so each ratio is taken under one load
    of a shared machine)."""
    torch.set_num_threads(1)
    trainers = {mode: Trainer(make_config(mixture, mode, 0, None, sets)) for mode in MODES}
    ratios = []
    for i in range(TIMING_ROUNDS):
        order = MODES if i % 2 == 0 else MODES[::-1]
        ms = {mode: _median_ms(trainers[mode].step, timing_steps) for mode in order}
        ratios.append(ms["aegan"] / ms["gan"])
    return statistics.median(ratios)


def _trained_with(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether the finished run in ``run_dir`` was trained with ``cfg`` (a changed preset or
    setting is a different run, whatever the folder is called)."""
    try:
        recorded = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    recorded.get("model", {}).pop("data_shape", None)
    wanted = cfg.to_dict()
    wanted["model"].pop("data_shape", None)
    return recorded == wanted


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    run_dir = Path(job["dir"])
    done = run_dir / "eval.json"
    cfg = make_config(job["mixture"], job["mode"], job["seed"], job["steps"], job["sets"])
    if done.exists() and not job["fresh"] and _trained_with(run_dir, cfg):
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start, cpu_start = time.perf_counter(), time.process_time()
    train(cfg, run_dir)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    model, info = load_model(run_dir)
    notes: list[str] = []
    reference = pick_reference(model.data_shape, info.pop("config"), None, notes)
    report = evaluate(model, reference, None, EVAL_SAMPLES, seed=0, notes=notes)
    result = {
        **{k: job[k] for k in ("mixture", "mode", "seed", "steps", "sets")},
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "metrics": report["metrics"],
        "histogram": report["details"]["modes"]["histogram"],
    }
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault(f"{r['mixture']}/{r['mode']}", {"runs": []})
        row["runs"].append(r)
    for row in rows.values():
        runs = sorted(row["runs"], key=lambda r: r["seed"])
        row["seeds"] = [r["seed"] for r in runs]
        row["steps"] = runs[0]["steps"]
        row["train_s"] = [r["train_s"] for r in runs]
        row["train_cpu_s"] = [r.get("train_cpu_s") for r in runs]
        for key in ("modes_captured", "modes_high_quality", "modes_reverse_kl", "energy_distance"):
            values = [r["metrics"][key] for r in runs]
            row[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        row.pop("runs")
    return rows


def _cell(stat: dict[str, float], fmt: str, scale: float = 1.0) -> str:
    mean, lo, hi = (scale * stat[k] for k in ("mean", "min", "max"))
    return f"{mean:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| mixture | mode | steps | CPU s per run (seeds) | modes captured | high quality % "
        "| reverse KL | energy distance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in summary["rows"].items():
        mixture, mode = key.split("/")
        k = SUITE[mixture].num_modes
        seconds = " / ".join(f"{s:.0f}" for s in row["train_cpu_s"])
        lines.append(
            f"| {mixture} | {mode} | {row['steps']} | {seconds}"
            f" | {_cell(row['modes_captured'], '.1f')} of {k}"
            f" | {_cell(row['modes_high_quality'], '.1f', 100)}"
            f" | {_cell(row['modes_reverse_kl'], '.3f')}"
            f" | {_cell(row['energy_distance'], '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixtures", default=",".join(SUITE))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SEC.KEY=V")
    parser.add_argument("--steps", type=int, default=None, help="AEGAN steps (default: preset)")
    parser.add_argument(
        "--gan-steps", type=int, default=None, help="GAN steps (default: the AEGAN's wall-clock)"
    )
    parser.add_argument("--timing-steps", type=int, default=30)
    parser.add_argument("--modes", default=",".join(MODES), help="e.g. aegan: tune its weights")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=Path("runs/vectors"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fresh", action="store_true", help="Redo runs that are done.")
    args = parser.parse_args()
    mixtures = [m for m in args.mixtures.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    aegan_steps = args.steps or from_preset(PRESET).train.steps
    if args.gan_steps is None:
        ratios = {m: round(step_ratio(m, args.sets, args.timing_steps), 3) for m in mixtures}
        print("AEGAN step / GAN step:", ratios, flush=True)
    else:  # equal steps, or any other budget named; no timing
        ratios = {m: args.gan_steps / aegan_steps for m in mixtures}
    jobs = []
    for seed in seeds:
        for mixture in mixtures:
            for mode in args.modes.split(","):
                steps = aegan_steps if mode == "aegan" else round(aegan_steps * ratios[mixture])
                name = f"{mixture}-{mode}-steps{steps}-seed{seed}"
                jobs.append(
                    {
                        "dir": str(args.runs / name),
                        "mixture": mixture,
                        "mode": mode,
                        "seed": seed,
                        "steps": steps,
                        "sets": args.sets,
                        "fresh": args.fresh,
                    }
                )
    start = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for result in pool.map(run_one, jobs):
            m = result["metrics"]
            print(
                f"{result['mixture']:>10} {result['mode']:>5} seed {result['seed']}: "
                f"{m['modes_captured']} modes, {100 * m['modes_high_quality']:.1f} % hq, "
                f"KL {m['modes_reverse_kl']:.3f}, {result['train_s']:.0f} s "
                f"({result.get('train_cpu_s', 0):.0f} s CPU)",
                flush=True,
            )
            results.append(result)
    summary = {
        "machine": machine(),
        "jobs": args.jobs,
        "preset": PRESET,
        "sets": args.sets,
        "aegan_steps": aegan_steps,
        "step_ratio_aegan_over_gan": ratios,
        "eval_samples": EVAL_SAMPLES,
        "wall_s": round(time.perf_counter() - start, 1),
        "command": " ".join(["python", "bench/vectors.py", *sys.argv[1:]]),
        "rows": summarise(results),
        "runs": results,
    }
    text = table(summary)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (args.out / "table.md").write_text(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
