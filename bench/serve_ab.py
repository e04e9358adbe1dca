"""The service at an earlier revision against the working tree, on the same load: is it slower?

Both are served from their own source tree (``bentoml serve`` run in a ``git worktree`` of the
revision, with that tree first on ``PYTHONPATH``; the shipped bundle of the working tree for both),
one after the other, in alternating order over ``--rounds`` rounds, each loaded with the closed-loop
clients of bench/serve.py: small and large requests, one client and several.

    .venv/bin/python bench/serve_ab.py --baseline 4cecb5c          # about 5 minutes on 2 cores
    .venv/bin/python bench/serve_ab.py --baseline 4cecb5c --rounds 1 --duration 2 --out /tmp/ab.json

Writes docs/bench-serve-ab.json: per round and per revision the requests/s and p50/p95 latency
of each load point, their medians over the rounds, and the working tree's over the revision's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from serve import REPO, run_load, scenarios, service, start, test_images

from aegan_core.bundle import DEFAULT_MODEL_DIR, load_bundle
from aegan_core.images import encode_png, load_uploads
from aegan_core.runtime import ModelRuntime

POINTS = [("sample-1", 1), ("sample-1", 8), ("encode-1", 1), ("encode-1", 8), ("encode-64", 8)]


def measure(root: Path, plan: list[tuple[Any, int]], seconds: float) -> dict[str, Any]:
    env = {"PYTHONPATH": str(root), "AEGAN_MODEL": str(DEFAULT_MODEL_DIR)}
    command, env, port = service(env)
    results = {}
    with start(root.name, command, env, port, cwd=root) as server:
        for scenario, clients in plan:
            asyncio.run(run_load(server.base, scenario, clients, 1.0))  # warm-up
            load = asyncio.run(run_load(server.base, scenario, clients, seconds)).summary()
            if load["errors"] or load["wrong"]:
                raise SystemExit(f"{root}: {scenario.name} x{clients}: {load}")
            results[f"{scenario.name} x{clients}"] = {
                k: round(load[k], 2) for k in ("req_per_s", "p50_ms", "p95_ms")
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the earlier revision")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per load point")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench-serve-ab.json")
    args = parser.parse_args()

    pngs = [encode_png(image[..., None]) for image in test_images(64)]
    bundle = load_bundle(DEFAULT_MODEL_DIR)
    model = ModelRuntime(bundle, "cpu", 1)
    limits = {"max_bytes": 1 << 30, "max_pixels": 1 << 30}
    latents = np.stack(
        [model.encode(load_uploads([p], bundle.data_shape, **limits))[0] for p in pngs]
    )
    by_name = {s.name: s for s in scenarios(pngs, latents)}
    plan = [(by_name[name], clients) for name, clients in POINTS]

    tree = Path(tempfile.mkdtemp(prefix="aegan-ab-")) / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=REPO,
                   check=True, capture_output=True)  # fmt: skip
    rounds: list[dict[str, Any]] = []
    try:
        for number in range(args.rounds):
            order = [("baseline", tree), ("working tree", REPO)]
            if number % 2:
                order.reverse()
            row = {}
            for label, root in order:
                print(f"round {number + 1}: {label}", flush=True)
                row[label] = measure(root, plan, args.duration)
            rounds.append(row)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
        shutil.rmtree(tree.parent, ignore_errors=True)

    medians: dict[str, dict[str, dict[str, float]]] = {}
    for label in ("baseline", "working tree"):
        medians[label] = {
            point: {
                k: round(statistics.median(r[label][point][k] for r in rounds), 2)
                for k in ("req_per_s", "p50_ms", "p95_ms")
            }
            for point in rounds[0][label]
        }
    ratio = {
        point: round(
            medians["working tree"][point]["req_per_s"] / medians["baseline"][point]["req_per_s"], 3
        )
        for point in medians["baseline"]
    }
    report = {
        "command": f"bench/serve_ab.py --baseline {args.baseline} --rounds {args.rounds} "
        f"--duration {args.duration:g}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "load_average_at_end": os.getloadavg()[0],
        "rounds": rounds,
        "medians": medians,
        "working_tree_over_baseline_req_per_s": ratio,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for point, value in ratio.items():
        base, new = medians["baseline"][point], medians["working tree"][point]
        print(
            f"{point:<14} {base['req_per_s']:8.1f} -> {new['req_per_s']:8.1f} req/s ({value:.2f}x)"
            f", p50 {base['p50_ms']:.1f} -> {new['p50_ms']:.1f} ms"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
