"""Plots and the serving section of docs/BENCHMARKS.md from bench/serve.py's JSON.

.venv/bin/python bench/serve_report.py [docs/bench-serve.json]   # redraw from a saved run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- serve-bench:start -->", "<!-- serve-bench:end -->"


def point(report: dict, server: str, scenario: str, concurrency: int) -> dict[str, Any] | None:
    for p in report["servers"].get(server, {}).get("points", []):
        if p["scenario"] == scenario and p["concurrency"] == concurrency:
            return p
    return None


def best(report: dict, server: str, scenario: str) -> dict[str, Any]:
    """The point of ``scenario`` with the highest throughput (over the concurrencies measured)."""
    points = [p for p in report["servers"][server]["points"] if p["scenario"] == scenario]
    return max(points, key=lambda p: p["img_per_s"])


def compare(
    target: str, ours: dict | None, theirs: dict | None, key: str, bound: float, at_most: bool
) -> tuple[str, str, bool] | None:
    """A target row for ``ours[key] / theirs[key]`` against ``bound``."""
    if not ours or not theirs:
        return None
    ratio = ours[key] / theirs[key]
    unit = "img/s" if key == "img_per_s" else "ms"
    where = f" (c={ours['concurrency']})" if "concurrency" in ours else ""
    measured = f"{ours[key]:.1f}{where} vs {theirs[key]:.1f} {unit} = {ratio:.2f}x"
    return target, measured, ratio <= bound if at_most else ratio >= bound


def targets(report: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target of the serving work, from one run."""
    inproc = report["in_process"]
    soak = report["servers"]["service"].get("soak") or point(report, "service", "encode-1", 32)
    base = point(report, "baseline", "encode-1", 32)
    rows = []
    if soak:
        seconds = soak["requests"] / soak["req_per_s"]
        failed = soak["errors"] + soak["wrong"] + soak["shed"]
        rows.append(
            (
                "/encode 1 image, 32 clients: 0 errors in >= 60 s",
                f"{soak['errors']} errors, {soak['wrong']} wrong, {soak['shed']} shed (429) in "
                f"{seconds:.0f} s ({soak['requests']} requests)",
                failed == 0 and seconds >= 60,
            )
        )
    rows += [
        compare(
            "/encode 1 image, 32 clients: throughput >= 1.0x baseline",
            soak,
            base,
            "img_per_s",
            1.0,
            at_most=False,
        ),
        compare(
            "/encode 1 image, 32 clients: p99 <= 2x baseline",
            soak,
            base,
            "p99_ms",
            2.0,
            at_most=True,
        ),
        compare(
            "/encode 1 image, 32 clients: batching >= 3x batching off",
            soak,
            point(report, "service-batching-off", "encode-1", 32),
            "img_per_s",
            3.0,
            at_most=False,
        ),
        compare(
            "/encode 64 images: >= 0.8x in-process decode + encode",
            best(report, "service", "encode-64"),
            inproc["encode-64"],
            "img_per_s",
            0.8,
            at_most=False,
        ),
        compare(
            "/sample n=64: >= 0.9x baseline (best concurrency of each)",
            best(report, "service", "sample-64"),
            best(report, "baseline", "sample-64"),
            "img_per_s",
            0.9,
            at_most=False,
        ),
        compare(
            "/sample n=64: >= 0.8x in-process",
            best(report, "service", "sample-64"),
            inproc["sample-64"],
            "img_per_s",
            0.8,
            at_most=False,
        ),
        compare(
            "/sample n=1, 1 client: p50 <= 1.3x baseline",
            point(report, "service", "sample-1", 1),
            point(report, "baseline", "sample-1", 1),
            "p50_ms",
            1.3,
            at_most=True,
        ),
        compare(
            "/sample n=1, 16 clients: p99 <= 2x baseline",
            point(report, "service", "sample-1", 16),
            point(report, "baseline", "sample-1", 16),
            "p99_ms",
            2.0,
            at_most=True,
        ),
    ]
    service = report["servers"]["service"]
    idle = service["rss_idle_mib"]
    worker = max((v for k, v in idle.items() if k.startswith("worker")), default=0)
    rows.append(("worker resident memory <= 200 MiB idle", f"{worker:.0f} MiB", 0 < worker <= 200))
    rows.append(
        (
            "start-up to ready <= 3 s (shipped bundle)",
            f"{service['ready_s']:.2f} s "
            f"(baseline {report['servers']['baseline']['ready_s']:.2f} s)",
            service["ready_s"] <= 3.0,
        )
    )
    return [row for row in rows if row is not None]


def plots(report: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = [s for s in report["servers"]["baseline"]["points"]]
    scenarios = list(dict.fromkeys(p["scenario"] for p in names))
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, scenario in zip(axes.flat, scenarios, strict=False):
        for server, style in (
            ("service", "o-"),
            ("baseline", "s--"),
            ("service-batching-off", "x:"),
            (next((k for k in report["servers"] if "-1-worker" in k), ""), "^-."),
        ):
            pts = [
                p
                for p in report["servers"].get(server, {}).get("points", [])
                if p["scenario"] == scenario
            ]
            if pts:
                ax.plot(
                    [p["concurrency"] for p in pts],
                    [p["img_per_s"] for p in pts],
                    style,
                    label=server,
                )
        if scenario in report["in_process"]:
            ax.axhline(
                report["in_process"][scenario]["img_per_s"], color="grey", lw=1, label="in-process"
            )
        ax.set_xscale("log", base=2)
        ax.set_title(scenario)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images/s")
        ax.set_ylim(bottom=0)
    axes.flat[0].legend(fontsize=7)
    for ax in axes.flat[len(scenarios) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (scenario, concurrency) in zip(
        axes, (("sample-1", 1), ("sample-1", 16), ("encode-1", 32)), strict=True
    ):
        for server in ("service", "baseline", "service-batching-off"):
            p = point(report, server, scenario, concurrency)
            if p and p["latencies_ms"]:
                lat = p["latencies_ms"]
                ax.plot(lat, [i / len(lat) for i in range(len(lat))], label=server)
        ax.set_xscale("log")
        ax.set_title(f"{scenario}, {concurrency} clients: latency CDF")
        ax.set_xlabel("ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=80)
    plt.close(fig)
    return ["throughput.png", "latency.png"]


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        START,
        "## Serving (bench/serve.py)",
        "",
        f"`.venv/bin/python bench/serve.py` on {m['cpus']} CPUs ({m['processor']}), Python "
        f"{m['python']}, no GPU; model `{m['model']}`; {report['duration_s']:g} s per load point, "
        f"started {report['started']}. Closed-loop clients (aiohttp) on the same machine, so the "
        "load generator shares the CPUs with the server; every ratio below is from this one run. "
        "Baseline: bench/baseline_server.py (Starlette + uvicorn, the same ONNX Runtime sessions "
        "and image code, no validation, limits, batching, metrics or tracing). In-process: the "
        "same work called in a loop without HTTP. Raw figures: docs/bench-serve.json. "
        f"Other load on the machine during the run: {report.get('load_note', 'not recorded')}. "
        "No GPU was available for this run: the CUDA provider (fp32 and fp16 graphs, IO binding) "
        "is not measured here.",
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for target, measured, met in targets(report):
        lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
    lines += [
        "",
        "### Throughput and latency",
        "",
        "| server | load | clients | images/s | requests/s | p50 ms | p95 ms | p99 ms | "
        "answers | wrong | images per encoder run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server, figures in report["servers"].items():
        for p in figures["points"] + ([figures["soak"]] if figures.get("soak") else []):
            batch = f"{p['mean_batch']:.1f}" if "mean_batch" in p else ""
            answers = ", ".join(f"{k}: {v}" for k, v in sorted(p["statuses"].items()))
            lines.append(
                f"| {server} | {p['scenario']} | {p['concurrency']} | {p['img_per_s']:.0f} | "
                f"{p['req_per_s']:.0f} | {p['p50_ms']:.1f} | {p['p95_ms']:.1f} | "
                f"{p['p99_ms']:.1f} | {answers} | {p['wrong']} | {batch} |"
            )
    lines += ["", "In-process (no HTTP, one call after another):", ""]
    lines += ["| work | images/s | calls/s |", "|---|---|---|"]
    for name, f in report["in_process"].items():
        lines.append(f"| {name} | {f['img_per_s']:.0f} | {f['req_per_s']:.0f} |")
    lines += ["", "Start-up and memory (resident set, MiB):", ""]
    lines += ["| server | ready after | idle | after the load |", "|---|---|---|---|"]
    for server, f in report["servers"].items():
        idle = ", ".join(f"{k} {v:.0f}" for k, v in f["rss_idle_mib"].items())
        after = ", ".join(f"{k} {v:.0f}" for k, v in f["rss_after_mib"].items())
        lines.append(f"| {server} | {f['ready_s']:.2f} s | {idle} | {after} |")
    lines += [
        "",
        "![throughput against concurrency](bench-serve/throughput.png)",
        "![latency distributions](bench-serve/latency.png)",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_docs(report: dict, docs: Path) -> None:
    plots(report, docs / "bench-serve")
    page = docs / "BENCHMARKS.md"
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    section = markdown(report)
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    page.write_text(text)
    print(f"wrote {page} and {docs / 'bench-serve'}/")


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "bench-serve.json"
    write_docs(json.loads(source.read_text()), REPO / "docs")
