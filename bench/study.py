"""AEGAN against the plain-GAN baseline on Fashion-MNIST at an equal, reduced budget.

Both modes share networks, data, optimiser, batch size and step count (the ``fmnist-cpu`` preset
cut to ``STEPS`` steps); only ``--mode`` differs. Each run evaluates itself every ``EVAL_EVERY``
steps on ``EVAL_SAMPLES`` samples (``train.eval_every``), and ``aegan eval`` measures the final EMA
weights on 10 000 samples. A few AEGAN loss variants run at the same budget with one seed each.

    nice -n 5 python bench/study.py run      # train and evaluate every run not done yet
    python bench/study.py report             # plots and tables into docs/study/

``run`` is resumable: a run with an ``eval.json`` is done, and a run with checkpoints but no final
evaluation is resumed. Wall-clock seconds exclude the time of the periodic evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = Path("runs/study")
DOCS = Path("docs/study")

STEPS = 1500
EVAL_EVERY = 250
FULL_STEPS = 10_000  # the shipped preset's budget, for the tuning that decides the default
EVAL_SAMPLES = 2000
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Run:
    name: str
    mode: str
    seed: int
    sets: tuple[str, ...] = ()  # extra --set assignments (variants)
    group: str = ""  # rows of the table: runs of one group are averaged over seeds
    steps: int = STEPS
    eval_every: int = EVAL_EVERY
    stage_steps: int = 0  # encoder-stage steps after the joint ones (train.encoder_stage_steps)

    @property
    def dir(self) -> Path:
        return RUNS_DIR / self.name

    @property
    def final_step(self) -> int:
        return self.steps + self.stage_steps


# The loss weights the first study ran with (the defaults then; the tuned ones replaced them).
FIRST_WEIGHTS = ("loss.adv_x=1", "loss.adv_z=1", "loss.recon_x_final=1")


def plan() -> list[Run]:
    runs = []
    for seed in SEEDS:  # pairs of one seed run side by side, under the same load
        runs.append(Run(f"aegan-seed{seed}", "aegan", seed, FIRST_WEIGHTS, "aegan"))
        runs.append(Run(f"gan-seed{seed}", "gan", seed, group="gan"))
    variants = {
        "recon_x=2": ("loss.recon_x=2",),
        "recon_x_final=0.2": ("loss.recon_x_final=0.2",),
        "instance_noise=0.1": ("loss.instance_noise=0.1",),
    }
    for label, sets in variants.items():
        runs.append(
            Run(
                f"aegan-{label.replace('=', '')}-seed0",
                "aegan",
                0,
                (*FIRST_WEIGHTS, *sets),  # later --set assignments win
                f"aegan {label}",
            )
        )
    # The GAN step is cheaper: twice the steps takes about the AEGAN run's wall-clock time.
    runs.append(Run("gan-steps3000-seed0", "gan", 0, (), "gan, 2x steps", 2 * STEPS))
    # Tuning at the full budget (one seed each): the shipped recipe is chosen from these.
    full = {
        "adv_z=3, recon_x_final=0.2": ("loss.adv_z=3", "loss.recon_x_final=0.2"),
        "adv_x=3, adv_z=3, recon_x_final=0.2": (
            "loss.adv_x=3",
            "loss.adv_z=3",
            "loss.recon_x_final=0.2",
        ),
        "adv_x=6, adv_z=3, recon_x_final=0.2": (
            "loss.adv_x=6",
            "loss.adv_z=3",
            "loss.recon_x_final=0.2",
        ),
    }
    seeds = {  # the candidates: a second seed each
        "adv_x=3, adv_z=3, recon_x_final=0.2": (0, 1),
        "adv_x=6, adv_z=3, recon_x_final=0.2": (0, 1),
    }
    for label, sets in full.items():
        name = label.replace("=", "").replace(", ", "-")
        for seed in seeds.get(label, (0,)):
            runs.append(
                Run(
                    f"full-aegan-{name}-seed{seed}",
                    "aegan",
                    seed,
                    sets,
                    f"aegan {label}",
                    FULL_STEPS,
                    1000,
                )  # fmt: skip
            )
    # More seeds of the baseline at the full budget (seed 0 is runs/fmnist-gan, RESULTS.md).
    for seed in (1, 2):
        runs.append(
            Run(f"full-gan-seed{seed}", "gan", seed, (), "gan, full budget", FULL_STEPS, 1000)
        )
    # The shipped recipe budgeted to the compute of the GAN's full budget (its schedules, such as
    # the reconstruction anneal, run over these steps), for bench/wallclock.py: 4 503 steps, from
    # docs/bench-step-cost.json as measured at ec6883e (equal_compute_steps() of that file).
    for seed in (0, 1, 2):
        group = "aegan, the GAN's full-budget compute"
        runs.append(Run(f"eqc-aegan-seed{seed}", "aegan", seed, (), group, 4503, 500))
    # Cheaper AEGAN steps at that compute: a quarter of each batch reconstructed, and that with
    # the reconstructions left out of the image adversarial game; steps from the step costs of
    # each variant and the GAN measured together (docs/bench-step-cost-variants.json).
    for variant, seeds in CHEAP_VARIANTS.items():
        sets = tuple(variant.split())
        name = "eqc-" + "-".join(a.partition(".")[2].replace("=", "") for a in sets)
        timed = COSTED_AS.get(variant, variant)
        steps = equal_compute_steps(f"aegan {timed}", VARIANT_COSTS)
        group = f"aegan {', '.join(sets)}, the GAN's full-budget compute"
        for seed in seeds:
            runs.append(Run(f"{name}-seed{seed}", "aegan", seed, sets, group, steps, 500))
    # The encoder stage: the shipped recipe for ENCODER_STAGE_JOINT joint steps, then
    # ENCODER_STAGE_STEPS steps of E alone against the frozen EMA generator. Its checkpoint at the
    # end of the joint steps is evaluated too (eval-joint.json): the same G, so FD-FMNIST is the
    # same, and the reconstruction and latent measures show what the stage adds.
    # The joint steps do not depend on the stage's length (same seed, same draws), so a longer
    # stage may start from a copy of a shorter one's joint checkpoint: `run` resumes it.
    for stage_steps in ENCODER_STAGE_STEPS:
        runs.append(
            Run(
                f"stage-joint{ENCODER_STAGE_JOINT}-stage{stage_steps}-seed0",
                "aegan",
                0,
                ("train.keep_checkpoints=20",),
                "aegan, then the encoder stage",
                ENCODER_STAGE_JOINT,
                0,  # no periodic evaluation: the two final ones are the comparison
                stage_steps,
            )
        )
    # The cheaper step with a stochastic encoder, batch-norm statistics recomputed for the EMA
    # networks, and a short encoder stage at the end, inside the same compute: the stage's
    # ENCODER_STAGE_STEPS[0] steps take the place of joint steps (a stage step is a G forward and
    # backward to its input plus E's: about one GAN step, here counted as one cheap step).
    sets = ("loss.recon_share=0.25", "loss.encoder_noise=0.2", "train.bn_recompute_batches=20")
    steps = equal_compute_steps("aegan loss.recon_share=0.25", VARIANT_COSTS)
    stage = ENCODER_STAGE_STEPS[0]
    for seed in (0, 1, 2):
        group = "aegan recon_share=0.25, encoder_noise=0.2, BN recomputed, encoder stage"
        runs.append(
            Run(
                f"eqc-noise-bn-stage-seed{seed}",
                "aegan",
                seed,
                sets,
                group,
                steps - stage,
                500,
                stage,
            )
        )
    return runs


ENCODER_STAGE_JOINT = 800  # joint steps of the encoder-stage run (what the shared CPU allowed)
ENCODER_STAGE_STEPS = (400, 2000)


CHEAP_VARIANTS = {  # settings -> seeds
    "loss.recon_share=0.25": (0, 1, 2),
    "loss.recon_share=0.25 loss.adv_x_recon=0": (0,),
    "loss.recon_share=0.25 loss.encoder_noise=0.2": (0,),
}
# Variants whose step costs what a timed one costs: the encoder noise is one draw of B x L normal
# numbers per code, nothing beside the networks' passes.
COSTED_AS = {"loss.recon_share=0.25 loss.encoder_noise=0.2": "loss.recon_share=0.25"}
VARIANT_COSTS = Path("docs/bench-step-cost-variants.json")


def equal_compute_steps(mode: str = "aegan", path: Path = Path("docs/bench-step-cost.json")) -> int:
    """AEGAN steps costing what FULL_STEPS GAN steps cost, by the step costs of the current losses
    measured in one run (bench/step_cost.py); ``mode`` names an AEGAN variant timed there."""
    ms = json.loads(path.read_text())["step_ms"]["current"]
    return round(FULL_STEPS * ms["gan"] / ms[mode])


def train_command(run: Run, threads: int) -> list[str]:
    cmd = ["aegan", "train", "--preset", "fmnist-cpu", "--mode", run.mode, "--seed", str(run.seed)]
    cmd += [
        "--steps",
        str(run.steps),
        "--threads",
        str(threads),
        "--no-progress",
        "--out",
        str(run.dir),
    ]
    cmd += [
        "--set",
        f"train.eval_every={run.eval_every}",
        "--set",
        f"train.eval_samples={EVAL_SAMPLES}",
    ]
    cmd += ["--set", f"train.checkpoint_every={400 if run.stage_steps else 500}"]
    if run.stage_steps:
        cmd += ["--set", f"train.encoder_stage_steps={run.stage_steps}"]
    for assignment in run.sets:
        cmd += ["--set", assignment]
    return cmd


def eval_command(run: Run, threads: int) -> list[str]:
    return ["aegan", "eval", str(run.dir), "--json", str(run.dir / "eval.json"),
            "--threads", str(threads)]  # fmt: skip


def joint_eval_command(run: Run, threads: int) -> list[str]:
    """A run with an encoder stage: its checkpoint at the end of the joint steps."""
    checkpoint = run.dir / "checkpoints" / f"step-{run.steps:07d}.pt"
    return ["aegan", "eval", str(checkpoint), "--json", str(run.dir / "eval-joint.json"),
            "--threads", str(threads)]  # fmt: skip


def _python(cmd: list[str]) -> list[str]:
    """``aegan ...`` through this interpreter, so the script needs no activated environment."""
    return [sys.executable, "-m", "aegan_cli", *cmd[1:]]


def execute(run: Run, threads: int) -> None:
    run.dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(RUNS_DIR / f"{run.name}.log", "a")  # noqa: SIM115 (closed below)
    try:
        if (run.dir / "eval.json").is_file():
            return
        if not (run.dir / "checkpoints" / f"step-{run.final_step:07d}.pt").is_file():
            cmd = train_command(run, threads)
            if (run.dir / "checkpoints").is_dir() and any((run.dir / "checkpoints").iterdir()):
                cmd = ["aegan", "train", "--resume", str(run.dir), "--no-progress"]
                if run.stage_steps:
                    cmd += ["--encoder-stage-steps", str(run.stage_steps)]
            print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd)}", flush=True)
            subprocess.run(_python(cmd), cwd=ROOT, stdout=log, stderr=log, check=True)
        cmds = [eval_command(run, threads)]
        joint = run.dir / "checkpoints" / f"step-{run.steps:07d}.pt"
        if run.stage_steps and not (run.dir / "eval-joint.json").is_file():
            if joint.is_file():
                cmds.insert(0, joint_eval_command(run, threads))
            else:  # the joint steps did not end on a checkpoint (train.checkpoint_every)
                print(f"{run.name}: no checkpoint at step {run.steps}, no joint evaluation")
        for cmd in cmds:
            print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd)}", flush=True)
            subprocess.run(_python(cmd), cwd=ROOT, stdout=log, stderr=log, check=True)
    finally:
        log.close()


# --- reading runs ---------------------------------------------------------------------------


def curve(run: Run) -> dict[str, list[float]]:
    """Periodic evaluations of a run: step, training seconds (evaluation time excluded), metrics."""
    out: dict[str, list[float]] = {"step": [], "seconds": []}
    eval_seconds = 0.0
    for line in (run.dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval/fd_fmnist" in record:
            out["step"].append(record["step"])
            out["seconds"].append(record["time_s"] - eval_seconds)
            for key, value in record.items():
                if key.startswith("eval/") and key != "eval/seconds":
                    out.setdefault(key.removeprefix("eval/"), []).append(value)
        eval_seconds += record.get("eval/seconds", 0.0)
    return out


def seconds_per_step(run: Run) -> float:
    """Median over log intervals of seconds per step (images/s at batch 64)."""
    rates = sorted(
        64 / json.loads(line)["images_per_s"]
        for line in (run.dir / "metrics.jsonl").read_text().splitlines()
    )
    return rates[len(rates) // 2]


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    n = len(values)
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, s, n


TABLE_KEYS = (
    ("fd_fmnist", "FD-FMNIST ↓", 2),
    ("precision", "precision ↑", 3),
    ("recall", "recall ↑", 3),
    ("coverage_kl", "class KL ↓", 3),
    ("coverage_classes", "classes ≥5 %", 1),
    ("recon_psnr", "recon PSNR dB ↑", 2),
    ("latent_mse", "latent MSE ↓", 3),
)
MAIN_GROUPS = ("aegan", "gan", "gan, 2x steps")


def real_data_row(num: int = 10_000) -> dict[str, float]:
    """The metrics of real images: ``num`` training images (a fixed subset) in place of samples.
    This is the floor a perfect generator would reach with this many samples."""
    cache = RUNS_DIR / "real-data.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    import numpy as np

    from training.config import DataConfig, fashion_mnist_dir
    from training.data import load_fashion_mnist
    from training.evaluate import evaluate, fmnist_reference
    from training.metrics import GenerativeModel

    train = load_fashion_mnist(fashion_mnist_dir(DataConfig()), "train").samples.numpy()
    images = train[np.random.default_rng(0).permutation(len(train))[:num]]
    cursor = [0]

    def replay(z: np.ndarray) -> np.ndarray:  # hands out the real images in order
        batch = images[cursor[0] : cursor[0] + len(z)]
        cursor[0] += len(z)
        return batch

    model = GenerativeModel(replay, None, 1, (1, 28, 28))
    metrics = ["fd_fmnist", "precision", "recall", "coverage"]
    result = evaluate(model, fmnist_reference(fashion_mnist_dir(DataConfig())), metrics, num)
    cache.write_text(json.dumps(result["metrics"], indent=1) + "\n")
    return result["metrics"]


def report(runs: list[Run]) -> None:
    done = [r for r in runs if (r.dir / "eval.json").is_file()]
    if not done:
        sys.exit("no finished runs under runs/study/")
    DOCS.mkdir(parents=True, exist_ok=True)
    finals = {r.name: json.loads((r.dir / "eval.json").read_text())["metrics"] for r in done}
    groups: dict[str, list[Run]] = {}
    for r in done:
        groups.setdefault(r.group, []).append(r)

    rows: dict[str, dict[str, Any]] = {}
    for group, members in groups.items():
        row: dict[str, Any] = {"seeds": [r.seed for r in members], "steps": members[0].steps}
        for key, _, _ in TABLE_KEYS:
            values = [finals[r.name][key] for r in members if key in finals[r.name]]
            if values:
                row[key] = mean_std(values)
        row["seconds_per_step"] = mean_std([seconds_per_step(r) for r in members])
        row["train_seconds"] = mean_std([curve(r)["seconds"][-1] for r in members])
        rows[group] = row

    header = ["runs", "steps", *[label for _, label, _ in TABLE_KEYS], "s/step", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, row in rows.items():
        cells = [f"{group} (seed {', '.join(map(str, row['seeds']))})", str(row["steps"])]
        cells += [_pm(row[key], digits) if key in row else "—" for key, _, digits in TABLE_KEYS]
        cells += [_pm(row["seconds_per_step"], 3), _pm(row["train_seconds"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    real = real_data_row()
    cells = ["real training images (10 000)", "—"]
    cells += [f"{real[key]:.{digits}f}" if key in real else "—" for key, _, digits in TABLE_KEYS]
    lines.append("| " + " | ".join([*cells, "—", "—"]) + " |")
    table = "\n".join(lines) + "\n"
    (DOCS / "table.md").write_text(table)
    print(table)

    summary = {
        "eval_every": EVAL_EVERY,
        "eval_samples": EVAL_SAMPLES,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, shared with other jobs",
        "commands": {
            r.name: [shlex.join(train_command(r, 1)), shlex.join(eval_command(r, 1))] for r in done
        },  # fmt: skip
        "groups": rows,
        "real_training_images": real,
        "runs": {r.name: {"final": finals[r.name], "curve": curve(r)} for r in done},
    }
    (DOCS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for r in done:  # the final sample grid of each group's first seed, for the write-up
        grid = r.dir / "samples" / f"fakes-{r.steps:07d}.png"
        if r.group in MAIN_GROUPS and r is groups[r.group][0] and grid.is_file():
            shutil.copyfile(grid, DOCS / f"samples-{r.name}.png")
    short = {g: [r for r in m if r.steps <= 2 * STEPS] for g, m in groups.items()}
    short = {g: m for g, m in short.items() if m}
    main_groups = {g: short[g] for g in MAIN_GROUPS if g in short}
    plot(main_groups, "curves.png", "AEGAN vs GAN: same networks, data, optimiser, batch 64")
    variants = {g: m for g, m in short.items() if g.startswith("aegan")}
    if len(variants) > 1:
        plot(variants, "variants.png", f"AEGAN loss variants, {STEPS} steps")
    full = {g: [r for r in m if r.steps == FULL_STEPS] for g, m in groups.items()}
    full = {g: m for g, m in full.items() if m}
    if full:  # with the GAN's first 3 000 steps: the same trajectory as its 10 000-step run
        if "gan, 2x steps" in groups:
            full["gan (seed 0, 3000 steps)"] = groups["gan, 2x steps"]
        title = f"AEGAN loss variants at the full budget ({FULL_STEPS} steps)"
        plot(full, "full.png", title, x_keys=("step",))  # runs ran under different loads
        full_table({g: [r.dir for r in m] for g, m in full.items() if g in groups}, finals)


# Full-budget seed-0 runs trained before this study, outside it (commands in docs/RESULTS.md):
# group -> (run directory, the JSON files of ``aegan eval`` whose metrics make up its results).
OUTSIDE = {
    "gan, full budget": ("runs/fmnist-gan", ("runs/study/fmnist-gan-eval.json",)),
    "aegan, first defaults": (
        "runs/fmnist-default",
        (
            "runs/fmnist-default/eval.json",
            "runs/fmnist-default/eval-recon-classes.json",  # --metrics coverage,reconstruction
        ),
    ),
}
_FULL_DIGITS = {"coverage_kl": 4, "coverage_classes": 0}  # small KLs, whole class counts
LATE_STEPS = 1000  # training losses are averaged over a run's last this many steps
FULL_KEYS = (
    *((key, label, _FULL_DIGITS.get(key, d)) for key, label, d in TABLE_KEYS[:6]),
    ("recon_class_agreement", "recon class agreement ↑", 3),
    ("loss/Dx/fake", f"Dx loss on G(z), last {LATE_STEPS} steps", 3),
    ("loss/Dz/encoded", f"Dz loss on E(x), last {LATE_STEPS} steps", 3),
)


def late_losses(run_dir: Path) -> dict[str, float]:
    """Mean of each logged training loss over the run's last ``LATE_STEPS`` steps (ln 2 = 0.693
    is a discriminator that cannot tell its two inputs apart)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in records if r["step"] > records[-1]["step"] - LATE_STEPS]
    keys = [k for k in late[-1] if k.startswith("loss/")]
    return {k: sum(r[k] for r in late) / len(late) for k in keys}


def full_table(groups: dict[str, list[Path]], finals: dict[str, dict[str, float]]) -> None:
    """The full-budget runs, each seed's value and the mean (docs/study/full-table.md)."""
    rows: dict[str, list[dict[str, float]]] = {}
    for group, (run_dir, paths) in OUTSIDE.items():
        if all(Path(p).is_file() for p in (*paths, f"{run_dir}/metrics.jsonl")):
            merged = late_losses(Path(run_dir))
            for path in paths:
                merged.update(json.loads(Path(path).read_text())["metrics"])
            rows[group] = [merged]
    for group, dirs in groups.items():
        rows[group] = rows.get(group, []) + [{**late_losses(d), **finals[d.name]} for d in dirs]
    header = ["runs", "seeds", *[label for _, label, _ in FULL_KEYS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, results in rows.items():
        cells = [group, str(len(results))]
        for key, _, digits in FULL_KEYS:
            values = [f[key] for f in results if key in f]
            text = " / ".join(f"{v:.{digits}f}" for v in values) or "—"
            if len(values) > 1:
                text += f" (mean {sum(values) / len(values):.{digits}f})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (DOCS / "full-table.md").write_text(table)
    print(table)


def _pm(value: tuple[float, float, int], digits: int) -> str:
    m, s, n = value
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def plot(
    groups: dict[str, list[Run]],
    filename: str,
    title: str,
    x_keys: tuple[str, ...] = ("step", "seconds"),
) -> None:
    """Periodic metrics against steps (left) and training wall-clock seconds (right, unless
    ``x_keys`` leaves them out): thin lines per seed, a thick line for the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("fd_fmnist", f"FD-FMNIST, {EVAL_SAMPLES} samples (lower is better)"),
        ("coverage_kl", "class KL to uniform, nats (lower is better)"),
        ("recall", "recall (higher is better)"),
    )
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    width = 5.5 * len(x_keys)
    fig, axes = plt.subplots(
        len(panels), len(x_keys), figsize=(width, 3.3 * len(panels)), squeeze=False
    )
    for colour, (group, members) in zip(colours, groups.items(), strict=False):
        curves = [curve(r) for r in members]
        n = min(len(c["step"]) for c in curves)
        for row, (key, label) in enumerate(panels):
            for col, x_key in enumerate(x_keys):
                ax = axes[row][col]
                if len(curves) > 1:
                    for c in curves:
                        ax.plot(c[x_key], c[key], color=colour, alpha=0.3, lw=0.8)
                xs = [sum(c[x_key][j] for c in curves) / len(curves) for j in range(n)]
                ys = [sum(c[key][j] for c in curves) / len(curves) for j in range(n)]
                seeds = f"mean of {len(curves)} seeds" if len(curves) > 1 else "1 seed"
                ax.plot(xs, ys, color=colour, lw=2, marker=".", label=f"{group} ({seeds})")
                ax.set_xlabel("training step" if x_key == "step" else "training wall-clock, s")
                ax.set_ylabel(label, fontsize=8)
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(DOCS / filename, dpi=100)
    plt.close(fig)
    print(f"wrote {DOCS / filename}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["run", "report", "commands"])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--only", default=None, help="comma-separated run names")
    args = parser.parse_args()
    runs = plan()
    if args.only:
        runs = [r for r in runs if r.name in args.only.split(",")]
    if args.action == "commands":
        for r in runs:
            print(shlex.join(train_command(r, args.threads)))
            if r.stage_steps:
                print(shlex.join(joint_eval_command(r, args.threads)))
            print(shlex.join(eval_command(r, args.threads)))
    elif args.action == "run":
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(execute, r, args.threads) for r in runs]:
                future.result()
    else:
        report(runs)


if __name__ == "__main__":
    main()
