"""What one slider move of the explorer page (/ui) costs: a /decode of one latent, over HTTP.

Against a running service (``bentoml serve --port 3000``), one client, one request at a time, as
the page sends them (it keeps at most one /decode in flight):

    python bench/decode_latency.py --url http://127.0.0.1:3000 --requests 200

Prints one JSON object: the machine, the model, and the round-trip milliseconds (median, p90,
p99, max) measured after ``--warmup`` requests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import urllib.request

import numpy as np


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()

    info = post(f"{args.url}/info", {})
    dim = info["model"]["latent_dim"]
    rng = np.random.default_rng(0)
    base = rng.standard_normal(dim)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    times = []
    for i in range(args.warmup + args.requests):
        z = base + (i % 61 - 30) / 10 * direction  # a slider sweeping from -3 to 3
        started = time.perf_counter()
        out = post(f"{args.url}/decode", {"latents": [z.tolist()]})
        elapsed = time.perf_counter() - started
        assert len(out["images"] or out["vectors"]) == 1
        if i >= args.warmup:
            times.append(1000 * elapsed)
    times.sort()
    print(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "load_average_1min": os.getloadavg()[0],
                },
                "model": info["model"]["name"],
                "runtime": info["runtime"],
                "requests": len(times),
                "ms": {
                    "median": round(statistics.median(times), 1),
                    "p90": round(times[int(0.9 * (len(times) - 1))], 1),
                    "p99": round(times[int(0.99 * (len(times) - 1))], 1),
                    "max": round(times[-1], 1),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
