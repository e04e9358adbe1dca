"""Many concurrent heavy uploads: memory stays bounded and health checks keep answering.

Starts ``bentoml serve`` with the shipped bundle and its defaults, sends ``--requests`` concurrent
``/reconstruct`` requests, each with one ``--side`` x ``--side`` RGBA PNG (the most pixels the
default ``AEGAN_MAX_PIXELS`` accepts, decoded at 4 bytes a pixel), in ``--rounds`` waves, while
asking ``/readyz`` every 0.2 s and sampling the resident memory of the server processes.

    .venv/bin/python bench/heavy_uploads.py                # 16 x 4096² PNGs, 3 rounds

Writes docs/bench-heavy-uploads.json and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402


def heavy_png(side: int) -> bytes:
    """A smooth RGBA picture: small as a file, ``side``² x 4 bytes once decoded."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.empty((side, side, 4), np.uint8)
    pixels[..., 0] = ramp[None, :]
    pixels[..., 1] = ramp[:, None]
    pixels[..., 2] = 128
    pixels[..., 3] = 200
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


async def run(server: bench.Server, body: bytes, args: argparse.Namespace) -> dict:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    ready = {"checks": 0, "failed": 0, "slowest_s": 0.0}
    peak = {"total": 0.0}
    done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def upload() -> None:
            started = time.perf_counter()
            headers = {"Content-Type": f"multipart/form-data; boundary={bench.BOUNDARY}"}
            try:
                async with session.post(
                    server.base + "/reconstruct", data=body, headers=headers
                ) as r:
                    await r.read()
                    statuses[str(r.status)] += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                statuses[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - started)

        async def watch() -> None:
            probe = aiohttp.ClientTimeout(total=2)
            while not done.is_set():
                started = time.perf_counter()
                ready["checks"] += 1
                try:
                    async with session.get(server.base + "/readyz", timeout=probe) as r:
                        ready["failed"] += r.status != 200
                except (TimeoutError, aiohttp.ClientError):
                    ready["failed"] += 1
                ready["slowest_s"] = max(ready["slowest_s"], time.perf_counter() - started)
                peak["total"] = max(peak["total"], sum(server.rss_mib().values()))
                await asyncio.sleep(0.2)

        watcher = asyncio.ensure_future(watch())
        for _ in range(args.rounds):
            await asyncio.gather(*(upload() for _ in range(args.requests)))
        done.set()
        await watcher
    return {
        "answers": dict(statuses),
        "slowest_answer_s": max(latencies),
        "readyz": ready,
        "rss_peak_total_mib": peak["total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument(
        "--out", type=Path, default=bench.REPO / "docs" / "bench-heavy-uploads.json"
    )
    args = parser.parse_args()
    png = heavy_png(args.side)
    body = bench.multipart([png])
    command, env, port = bench.service({})
    with bench.start("service", command, env, port) as server:
        idle = server.rss_mib()
        figures = asyncio.run(run(server, body, args))
    report = {
        "command": " ".join(sys.argv),
        "upload": {
            "side": args.side,
            "png_bytes": len(png),
            "decoded_mib": args.side**2 * 4 / 2**20,
        },
        "concurrent_requests": args.requests,
        "rounds": args.rounds,
        "rss_idle_total_mib": sum(idle.values()),
        **figures,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
