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


def targets(report: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target of the serving work, from one run."""
    rows: list[tuple[str, str, bool]] = []
    inproc = report["in_process"]
    soak = report["servers"]["service"].get("soak") or point(report, "service", "encode-1", 32)
    base = point(report, "baseline", "encode-1", 32)
    off = point(report, "service-batching-off", "encode-1", 32)
    if soak and base:
        seconds = soak["requests"] / soak["req_per_s"]
        rows.append(
            (
                "/encode 1 image, 32 clients: 0 errors in >= 60 s",
                f"{soak['errors']} errors, {soak['wrong']} wrong, {soak['shed']} shed (429) in "
                f"{seconds:.0f} s "
                f"({soak['requests']} requests)",
                soak["errors"] + soak["wrong"] + soak["shed"] == 0 and seconds >= 60,
            )
        )
        ratio = soak["img_per_s"] / base["img_per_s"]
        rows.append(
            (
                "/encode 1 image, 32 clients: throughput >= 1.0x baseline",
                f"{soak['img_per_s']:.0f} vs {base['img_per_s']:.0f} img/s = {ratio:.2f}x",
                ratio >= 1.0,
            )
        )
        ratio = soak["p99_ms"] / base["p99_ms"]
        rows.append(
            (
                "/encode 1 image, 32 clients: p99 <= 2x baseline",
                f"{soak['p99_ms']:.0f} vs {base['p99_ms']:.0f} ms = {ratio:.2f}x",
                ratio <= 2.0,
            )
        )
    if soak and off:
        ratio = soak["img_per_s"] / off["img_per_s"]
        rows.append(
            (
                "/encode 1 image, 32 clients: batching >= 3x batching off",
                f"{soak['img_per_s']:.0f} vs {off['img_per_s']:.0f} img/s = {ratio:.2f}x",
                ratio >= 3.0,
            )
        )
    best = max(
        (p for p in report["servers"]["service"]["points"] if p["scenario"] == "encode-64"),
        key=lambda p: p["img_per_s"],
    )
    ratio = best["img_per_s"] / inproc["encode-64"]["img_per_s"]
    rows.append(
        (
            "/encode 64 images: >= 0.8x in-process decode + encode",
            f"{best['img_per_s']:.0f} (c={best['concurrency']}) vs "
            f"{inproc['encode-64']['img_per_s']:.0f} img/s = {ratio:.2f}x",
            ratio >= 0.8,
        )
    )
    service64 = max(
        (p for p in report["servers"]["service"]["points"] if p["scenario"] == "sample-64"),
        key=lambda p: p["img_per_s"],
    )
    base64 = max(
        (p for p in report["servers"]["baseline"]["points"] if p["scenario"] == "sample-64"),
        key=lambda p: p["img_per_s"],
    )
    ratio = service64["img_per_s"] / base64["img_per_s"]
    rows.append(
        (
            "/sample n=64: >= 0.9x baseline (best concurrency of each)",
            f"{service64['img_per_s']:.0f} vs {base64['img_per_s']:.0f} img/s = {ratio:.2f}x",
            ratio >= 0.9,
        )
    )
    ratio = service64["img_per_s"] / inproc["sample-64"]["img_per_s"]
    rows.append(
        (
            "/sample n=64: >= 0.8x in-process",
            f"{service64['img_per_s']:.0f} vs {inproc['sample-64']['img_per_s']:.0f} img/s "
            f"= {ratio:.2f}x",
            ratio >= 0.8,
        )
    )
    s1, b1 = point(report, "service", "sample-1", 1), point(report, "baseline", "sample-1", 1)
    if s1 and b1:
        ratio = s1["p50_ms"] / b1["p50_ms"]
        rows.append(
            (
                "/sample n=1, 1 client: p50 <= 1.3x baseline",
                f"{s1['p50_ms']:.2f} vs {b1['p50_ms']:.2f} ms = {ratio:.2f}x",
                ratio <= 1.3,
            )
        )
    s16, b16 = point(report, "service", "sample-1", 16), point(report, "baseline", "sample-1", 16)
    if s16 and b16:
        ratio = s16["p99_ms"] / b16["p99_ms"]
        rows.append(
            (
                "/sample n=1, 16 clients: p99 <= 2x baseline",
                f"{s16['p99_ms']:.1f} vs {b16['p99_ms']:.1f} ms = {ratio:.2f}x",
                ratio <= 2.0,
            )
        )
    service = report["servers"]["service"]
    worker = max(
        (v for k, v in service["rss_idle_mib"].items() if k.startswith("worker")), default=0
    )
    rows.append(("worker resident memory <= 200 MiB idle", f"{worker:.0f} MiB", 0 < worker <= 200))
    rows.append(
        (
            "start-up to ready <= 3 s (shipped bundle)",
            f"{service['ready_s']:.2f} s "
            f"(baseline {report['servers']['baseline']['ready_s']:.2f} s)",
            service["ready_s"] <= 3.0,
        )
    )
    return rows


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
