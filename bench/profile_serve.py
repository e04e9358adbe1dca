"""Where a served request's CPU time goes: py-spy samples one service worker under load.

Starts ``bentoml serve`` (one worker, so one process holds all the work), loads it with closed-loop
clients for one scenario of bench/serve.py and attributes the worker's busy samples to the layer
they were taken in (ONNX Runtime, image codecs, this service's code, BentoML's middlewares,
uvicorn, ...), by the innermost frame of a known package. Idle samples (threads waiting) are left
out. Also prints the server's CPU milliseconds per request, against the hand-written baseline's.

    .venv/bin/python bench/profile_serve.py sample-1 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402

from aegan_core.images import encode_png  # noqa: E402

# Innermost frame whose file path contains one of these names decides the layer of a sample.
LAYERS = {
    "onnxruntime": "ONNX Runtime",
    "/PIL/": "Pillow (PNG, decoding)",
    "aegan_serve/middleware": "request guard",
    "aegan_serve/": "service code",
    "opentelemetry": "BentoML: tracing",
    "prometheus_client": "BentoML: metrics",
    "instruments.py": "BentoML: metrics",
    "http/access.py": "BentoML: access log",
    "/logging/": "BentoML: access log",
    "pydantic": "validation (pydantic)",
    "_bentoml_sdk": "BentoML: IO models",
    "_bentoml_impl": "BentoML: server app",
    "bentoml/_internal": "BentoML: server app",
    "python_multipart": "multipart parsing",
    "starlette": "Starlette",
    "uvicorn": "uvicorn (HTTP)",
    "anyio": "thread hops",
    "concurrent/futures": "thread hops",
    "asyncio": "event loop",
    "uvloop": "event loop",
}
IDLE = ("Condition.wait", "Queue.get", "_worker (concurrent", "select (", "poll (", "epoll")


def layer_of(stack: list[str]) -> str | None:
    if any(marker in stack[-1] for marker in IDLE):
        return None
    for frame in reversed(stack):
        for key, layer in LAYERS.items():
            if key in frame:
                return layer
    return "other"


def cpu_ms_per_request(server: bench.Server, scenario: bench.Scenario, seconds: float) -> float:
    root = psutil.Process(server.process.pid)
    procs = [root, *root.children(recursive=True)]

    def used() -> float:
        return sum(p.cpu_times().user + p.cpu_times().system for p in procs)

    before = used()
    load = asyncio.run(bench.run_load(server.base, scenario, 1, seconds))
    return 1000 * (used() - before) / max(load.requests, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", help="a scenario of bench/serve.py, e.g. sample-1, encode-1")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()

    pngs = [encode_png(image[..., None]) for image in bench.test_images(64)]
    plan = {s.name: s for s in bench.scenarios(pngs, np.zeros((len(pngs), 32), np.float32))}
    scenario = plan[args.scenario]
    scenario.check = None

    command, env, port = bench.baseline(1)
    with bench.start("baseline", command, env, port) as server:
        asyncio.run(bench.run_load(server.base, scenario, 1, 1.0))
        baseline_ms = cpu_ms_per_request(server, scenario, args.seconds / 2)

    command, env, port = bench.service({"AEGAN_WORKERS": "1"})
    with bench.start("service", command, env, port) as server:
        asyncio.run(bench.run_load(server.base, scenario, 1, 1.0))
        service_ms = cpu_ms_per_request(server, scenario, args.seconds / 2)
        worker = next(
            p
            for p in psutil.Process(server.process.pid).children(recursive=True)
            if "_bentoml_impl.worker" in " ".join(p.cmdline())
        )
        with tempfile.NamedTemporaryFile(suffix=".txt") as out:
            spy = subprocess.Popen(
                [
                    str(bench.BIN / "py-spy"),
                    "record",
                    "--pid",
                    str(worker.pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    out.name,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            asyncio.run(bench.run_load(server.base, scenario, args.clients, args.seconds))
            spy.wait()
            lines = Path(out.name).read_text().splitlines()

    layers: Counter[str] = Counter()
    for line in lines:
        stack, count = line.rsplit(" ", 1)
        layer = layer_of(stack.split(";"))
        if layer is not None:
            layers[layer] += int(count)
    busy = sum(layers.values())
    print(f"{args.scenario}, {args.clients} clients: {busy} busy samples of the service worker")
    for layer, count in layers.most_common():
        print(f"  {100 * count / busy:5.1f} %  {layer}")
    print(
        f"server CPU per request, one client: service {service_ms:.2f} ms, "
        f"hand-written baseline {baseline_ms:.2f} ms"
    )


if __name__ == "__main__":
    main()
