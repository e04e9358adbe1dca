"""Soak: the real service under a long, mixed and partly hostile load.

Starts ``bentoml serve`` with the shipped bundle and its default settings, then for ``--minutes``
keeps ``--clients`` closed-loop clients busy with a realistic mix of every endpoint plus a share
of hostile requests (corrupt and crafted uploads, oversized and malformed bodies, wrong latents).
Meanwhile it asks ``/livez`` and ``/readyz`` every second (2 s timeout) and samples the resident
memory of every server process. Records answers by status for the normal and the hostile share,
latency percentiles, requests that hung (no answer within 60 s), and the memory curve.

    .venv/bin/python bench/soak.py                     # 10 minutes, 64 clients
    .venv/bin/python bench/soak.py --minutes 1 --out /tmp/soak.json

Writes docs/soak.json and docs/soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402

from aegan_core.images import encode_png  # noqa: E402

FORM = "multipart/form-data; boundary=" + bench.BOUNDARY


def progressive_jpeg(repeats: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (1024, 1024), 128).save(buffer, "JPEG", progressive=True)
    raw = buffer.getvalue()
    last, end = raw.rfind(b"\xff\xda"), raw.rfind(b"\xff\xd9")
    return raw[:end] + raw[last:end] * repeats + raw[end:]


def mix(pngs: list[bytes]) -> list[tuple[str, float, str, bytes, str]]:
    """(name, weight, path, body, content type); names starting with "hostile" expect a 4xx."""

    def as_json(body: object) -> bytes:
        return json.dumps(body).encode()

    normal = [
        ("sample-1", 20, "/sample", as_json({"n": 1}), "application/json"),
        ("sample-16", 5, "/sample", as_json({"n": 16}), "application/json"),
        ("generate-8", 5, "/generate", as_json({"n": 8}), "application/json"),
        ("decode-4", 10, "/decode", as_json({"latents": [[0.1] * 32] * 4}), "application/json"),
        ("encode-1", 25, "/encode", bench.multipart(pngs[:1]), FORM),
        ("encode-16", 10, "/encode", bench.multipart(pngs[:16]), FORM),
        ("reconstruct-4", 8, "/reconstruct", bench.multipart(pngs[:4]), FORM),
        (
            "interpolate",
            5,
            "/interpolate",
            as_json({"seeds": [1, 2], "steps": 8}),
            "application/json",
        ),
        ("info", 2, "/info", b"{}", "application/json"),
    ]
    hostile = [
        ("hostile-corrupt-png", 1, "/encode", bench.multipart([pngs[0][:40]]), FORM),
        ("hostile-text-as-image", 1, "/reconstruct", bench.multipart([b"hello"]), FORM),
        ("hostile-jpeg-scans", 1, "/encode", bench.multipart([progressive_jpeg(500)]), FORM),
        (
            "hostile-big-json",
            1,
            "/decode",
            b'{"latents": [[' + b"0.5," * 600_000 + b"0]]}",
            "application/json",
        ),
        (
            "hostile-wrong-latent",
            1,
            "/decode",
            as_json({"latents": [[0.1] * 7]}),
            "application/json",
        ),
        ("hostile-nan", 1, "/decode", b'{"latents": [[NaN]]}', "application/json"),
        (
            "hostile-deep-json",
            1,
            "/decode",
            b'{"latents": ' + b"[" * 50_000 + b"}",
            "application/json",
        ),
        (
            "hostile-long-number",
            1,
            "/interpolate",
            b"steps=" + b"9" * 5000,
            "application/x-www-form-urlencoded",
        ),
        (
            "hostile-url-field",
            1,
            "/encode",
            b"imag%65s=http://127.0.0.1:1/x",
            "application/x-www-form-urlencoded",
        ),
        ("hostile-n-too-big", 1, "/sample", as_json({"n": 10_000}), "application/json"),
    ]
    return normal + hostile


async def soak(base: str, server: bench.Server, args: argparse.Namespace, pngs: list[bytes]):
    requests = mix(pngs)
    names = [r[0] for r in requests]
    weights = [r[1] for r in requests]
    rng = random.Random(0)
    statuses: dict[str, Counter[str]] = {name: Counter() for name in names}
    latencies: dict[str, list[float]] = {"normal": [], "hostile": []}
    hung = 0
    health = {"checks": 0, "failed": 0, "slowest_s": 0.0}
    memory: list[dict] = []
    deadline = time.perf_counter() + args.minutes * 60
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=args.clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal hung
            while time.perf_counter() < deadline:
                name, _, path, body, content_type = requests[
                    rng.choices(range(len(names)), weights)[0]
                ]
                t0 = time.perf_counter()
                try:
                    async with session.post(
                        base + path, data=body, headers={"Content-Type": content_type}
                    ) as answer:
                        await answer.read()
                        status = str(answer.status)
                except TimeoutError:
                    hung += 1
                    status = "timeout"
                except aiohttp.ClientError as exc:
                    status = type(exc).__name__
                statuses[name][status] += 1
                kind = "hostile" if name.startswith("hostile") else "normal"
                latencies[kind].append((time.perf_counter() - t0) * 1000)

        async def watch() -> None:
            probe = aiohttp.ClientTimeout(total=2)
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                for path in ("/livez", "/readyz"):
                    health["checks"] += 1
                    try:
                        async with session.get(base + path, timeout=probe) as answer:
                            if answer.status != 200:
                                health["failed"] += 1
                    except (TimeoutError, aiohttp.ClientError):
                        health["failed"] += 1
                health["slowest_s"] = max(health["slowest_s"], time.perf_counter() - t0)
                memory.append({"t": round(time.perf_counter() - started, 1), **server.rss_mib()})
                await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))

        await asyncio.gather(watch(), *(client() for _ in range(args.clients)))
    return statuses, latencies, hung, health, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--out", type=Path, default=bench.REPO / "docs" / "soak.json")
    args = parser.parse_args()
    pngs = [encode_png(image[..., None]) for image in bench.test_images(16)]
    command, env, port = bench.service({})
    with bench.start("service", command, env, port) as server:
        idle = server.rss_mib()
        statuses, latencies, hung, health, memory = asyncio.run(
            soak(server.base, server, args, pngs)
        )
    total = lambda row: sum(v for k, v in row.items() if k != "t")  # noqa: E731
    warm = [total(m) for m in memory if 60 <= m["t"] < 120] or [total(memory[0])]
    last = [total(m) for m in memory if m["t"] >= memory[-1]["t"] - 60]
    normal = {n: dict(c) for n, c in statuses.items() if not n.startswith("hostile")}
    hostile = {n: dict(c) for n, c in statuses.items() if n.startswith("hostile")}
    fives = sum(v for c in statuses.values() for k, v in c.items() if k.startswith("5"))
    hostile_not_4xx = sum(
        v for c in hostile.values() for k, v in c.items() if not k.startswith("4")
    )
    report = {
        "command": " ".join(sys.argv),
        "minutes": args.minutes,
        "clients": args.clients,
        "machine": {"cpus": bench.available_cpus()},
        "requests": sum(sum(c.values()) for c in statuses.values()),
        "server_errors_5xx": fives,
        "hung": hung,
        "hostile_not_answered_4xx": hostile_not_4xx,
        "normal": normal,
        "hostile": hostile,
        "latency_ms": {
            kind: {
                "p50": float(np.percentile(values, 50)),
                "p99": float(np.percentile(values, 99)),
            }
            for kind, values in latencies.items()
            if values
        },
        "health": health,
        "rss_idle_mib": idle,
        "rss_total_mib": {
            "after_warm_up": float(np.mean(warm)),
            "last_minute": float(np.mean(last)),
            "growth": float(np.mean(last) / np.mean(warm) - 1),
            "max": max(total(m) for m in memory),
        },
        "memory": memory,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(memory, args.out.with_suffix(".png"))
    summary = {k: v for k, v in report.items() if k not in ("memory", "normal", "hostile")}
    print(json.dumps(summary, indent=1))


def plot(memory: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    keys = sorted({k for m in memory for k in m if k != "t"})
    for key in keys:
        ax.plot([m["t"] for m in memory], [m.get(key, np.nan) for m in memory], label=key)
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident MiB")
    ax.set_title("server processes' memory during the soak")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
