"""AEGAN against the GAN at equal compute, from the recorded study runs.

The study's runs (docs/study/summary.json, written by ``bench/study.py report``) evaluated
themselves every few hundred steps; their wall-clock seconds were measured under different loads
of a shared machine, so they cannot be compared directly. Here each evaluation is placed on one
clock instead: its step times the step cost of its mode, both measured in one run, alternating
(docs/bench-step-cost.json, written by ``bench/step_cost.py``; the revision the study ran). The
AEGAN's and the GAN's curves are then read at the same cost.

    .venv/bin/python bench/wallclock.py        # docs/study/wallclock.png and wallclock.md

The runs above read the shipped recipe midway through a 10 000-step schedule. The recipe budgeted
to the GAN's compute is trained by ``bench/study.py run --only eqc-aegan-seed0,...,eqc-aegan-seed2``
(steps from the same step costs), and its cheaper-step variants by the study's other ``eqc-*``
runs (steps from docs/bench-step-cost-variants.json); when such runs are present their final
evaluations (10 000 samples) are kept in docs/study/equal-compute.json and tabled beside the GAN's
(the GAN's own further seeds, ``full-gan-seed*``, are kept there too when run).

Periodic evaluations use 2 000 samples (FD-FMNIST is biased upwards at that size, and recall
depends on it); both modes are measured the same way, so they compare with each other, not with
the 10 000-sample figures elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

DOCS = Path("docs/study")
STEP_COST = Path("docs/bench-step-cost.json")
FULL_STEPS = 10_000  # the GAN's full budget
STUDY_REVISION = "e9dcec3"  # the losses the study's runs were trained with
GROUPS = {  # label -> run names in summary.json (the tuned AEGAN is the shipped recipe)
    "aegan (shipped recipe), 10 000 steps": (
        "full-aegan-adv_x3-adv_z3-recon_x_final0.2-seed0",
        "full-aegan-adv_x3-adv_z3-recon_x_final0.2-seed1",
    ),
    "gan, 10 000 steps": ("full-gan-seed1",),
    "aegan (first defaults), 1 500 steps": ("aegan-seed0", "aegan-seed1", "aegan-seed2"),
    "gan, 1 500 steps": ("gan-seed0", "gan-seed1", "gan-seed2"),
    "gan, 3 000 steps": ("gan-steps3000-seed0",),
}
KEYS = (
    ("fd_fmnist", "FD-FMNIST (2 000 samples, lower is better)"),
    ("recall", "recall (higher is better)"),
    ("coverage_kl", "class KL to uniform, nats (lower is better)"),
)


def step_seconds() -> dict[str, float]:
    record = json.loads(STEP_COST.read_text())
    ms = record["step_ms"][STUDY_REVISION]
    return {mode: ms[mode] / 1000 for mode in ("aegan", "gan")}


def group_curves(runs: dict[str, Any], names: tuple[str, ...], cost: float) -> dict[str, Any]:
    curves = [runs[n]["curve"] for n in names if n in runs]
    n = min(len(c["step"]) for c in curves)
    out: dict[str, Any] = {"seeds": len(curves), "step": curves[0]["step"][:n]}
    out["cost_s"] = [s * cost for s in out["step"]]
    for key, _ in KEYS:
        per_seed = np.array([c[key][:n] for c in curves], dtype=float)
        out[key] = per_seed.mean(axis=0).tolist()
        out[f"{key}_range"] = [per_seed.min(axis=0).tolist(), per_seed.max(axis=0).tolist()]
    return out


def at_cost(group: dict[str, Any], cost_s: float, key: str) -> float | None:
    """The group's mean curve read (linearly) at ``cost_s``; None beyond its last evaluation."""
    xs, ys = group["cost_s"], group[key]
    if cost_s > xs[-1] + 1e-9 or cost_s < xs[0] - 1e-9:
        return None
    return float(np.interp(cost_s, xs, ys))


def main() -> None:
    runs = json.loads((DOCS / "summary.json").read_text())["runs"]
    seconds = step_seconds()
    groups = {
        label: group_curves(runs, names, seconds["aegan" if label.startswith("aegan") else "gan"])
        for label, names in GROUPS.items()
    }
    plot(groups)
    lines = [
        f"Step cost ({STEP_COST}, revision {STUDY_REVISION}, one thread): aegan "
        f"{1000 * seconds['aegan']:.1f} ms, gan {1000 * seconds['gan']:.1f} ms "
        f"({seconds['aegan'] / seconds['gan']:.2f}x).",
        "",
        "| budget: bench-clock s (cost of) | mode, run | step reached | seeds | FD-FMNIST | recall "
        "| class KL |",
        "|---|---|---|---|---|---|---|",
    ]
    budgets = (
        ("gan, 10 000 steps", "aegan (shipped recipe), 10 000 steps"),
        ("gan, 3 000 steps", "aegan (first defaults), 1 500 steps"),
    )
    for gan_label, aegan_label in budgets:
        gan, aegan = groups[gan_label], groups[aegan_label]
        budget = gan["cost_s"][-1]
        for label, group in ((gan_label, gan), (aegan_label, aegan)):
            step = budget / seconds["aegan" if label.startswith("aegan") else "gan"]
            values = [at_cost(group, budget, key) for key, _ in KEYS]
            cells = ["—" if v is None else f"{v:.3f}" for v in values]
            lines.append(
                f"| {budget:.0f} s ({gan_label}) | {label} | {step:.0f} | {group['seeds']} | "
                + " | ".join(cells)
                + " |"
            )
    lines += ["", *equal_compute_table(runs)]
    table = "\n".join(lines) + "\n"
    (DOCS / "wallclock.md").write_text(table)
    print(table)


EQUAL_COMPUTE = DOCS / "equal-compute.json"
FINAL_KEYS = ("fd_fmnist", "precision", "recall", "coverage_kl", "coverage_classes", "recon_psnr")


def equal_compute_table(runs: dict[str, Any]) -> list[str]:
    """Final evaluations (10 000 samples) of the AEGAN runs trained for the GAN's full-budget
    compute (the shipped recipe and the cheaper-step variants of bench/study.py), beside the GAN's
    full budget."""
    found = [*Path("runs/study").glob("eqc-*/eval.json")]
    found += Path("runs/study").glob("full-gan-seed*/eval.json")  # the GAN's further seeds
    if found:
        records = json.loads(EQUAL_COMPUTE.read_text()) if EQUAL_COMPUTE.is_file() else {}
        for path in found:
            report = json.loads(path.read_text())
            records[path.parent.name] = {"step": report["step"], **report["metrics"]}
        records = dict(sorted(records.items()))
        EQUAL_COMPUTE.write_text(json.dumps(records, indent=1) + "\n")
    elif EQUAL_COMPUTE.is_file():
        records = json.loads(EQUAL_COMPUTE.read_text())
    else:
        return []
    if "full-gan-seed1" not in records:  # from the study's summary when not run here
        records["full-gan-seed1"] = {"step": FULL_STEPS, **runs["full-gan-seed1"]["final"]}
    rows = [(name, r) for name, r in records.items() if name.startswith("eqc-")]
    rows += [
        (f"{name} ({r['step']:,} steps)".replace(",", " "), r)
        for name, r in sorted(records.items())
        if name.startswith("full-gan-")
    ]
    header = ["run", "steps", *FINAL_KEYS]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows:
        cells = [name, str(r["step"])]
        cells += ["—" if r.get(k) is None else f"{r[k]:.4g}" for k in FINAL_KEYS]
        out.append("| " + " | ".join(cells) + " |")
    return out


def plot(groups: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEYS), figsize=(5.2 * len(KEYS), 3.8))
    colours = ["tab:blue", "tab:orange", "tab:cyan", "tab:red", "tab:brown"]
    for colour, (label, group) in zip(colours, groups.items(), strict=False):
        dashed = "1 500" in label or "3 000" in label
        for ax, (key, title) in zip(axes, KEYS, strict=True):
            low, high = group[f"{key}_range"]
            if group["seeds"] > 1:
                ax.fill_between(group["cost_s"], low, high, color=colour, alpha=0.15)
            ax.plot(
                group["cost_s"],
                group[key],
                color=colour,
                ls="--" if dashed else "-",
                marker=".",
                label=f"{label} ({group['seeds']} seed{'s' if group['seeds'] > 1 else ''})",
            )
            ax.set_xlabel("compute: steps x measured step cost, s (one thread)")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("AEGAN against the GAN at equal compute (Fashion-MNIST, batch 64)", fontsize=10)
    fig.tight_layout()
    fig.savefig(DOCS / "wallclock.png", dpi=100)
    plt.close(fig)
    print(f"wrote {DOCS / 'wallclock.png'}")


if __name__ == "__main__":
    main()
