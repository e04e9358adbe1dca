"""API keys and quotas under load: what they cost, whether quotas hold across workers (with Redis
and without it for a while), and what a burst of bad requests writes to the log.

Three parts, each against ``bentoml serve`` on the shipped bundle, all traffic to 127.0.0.1:

- ``overhead``: ``/sample`` n=1 throughput, 16 closed-loop clients, with keys and quotas off and on
  (a valid key on every request, budgets far above the load so nothing is refused), alternating
  the two servers for ``--rounds`` rounds in the same run; reports the ratio on / off (target:
  the cost is at most 5 %).
- ``quotas``: 64 clients over 8 keys, 2 workers sharing one Redis (``redis-server`` on a free
  port), every key over its budget; per key, the rate of answers 200 against its quota (target
  within 10 %) and the count of 5xx (target 0); then the same with Redis killed ``--outage``
  seconds in the middle and started again (``AEGAN_RATE_LIMIT_FAILURE=local``).
- ``logs``: 1 000 bad requests of seven kinds (no key, wrong key, wrong scope, invalid field,
  malformed body, oversized body, unknown path); the lines the server wrote meanwhile, the
  refusal lines among them and any traceback (target: at most 1 000 lines, no traceback).

    .venv/bin/python bench/access.py                               # about 4 minutes
    .venv/bin/python bench/access.py --duration 8 --outage 3 --rounds 1 --out /tmp/access.json

Writes docs/bench-access.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from process_helpers import stop_group  # noqa: E402
from redis_helpers import Redis, free_port  # noqa: E402

from aegan_core.runtime import available_cpus  # noqa: E402
from aegan_serve.apikeys import create_key  # noqa: E402

BIN = Path(sys.executable).parent
KEYS = 8
CLIENTS = 64
RATE, BURST = 5, 10  # per key in `quotas`: 10 requests in any 2 s


@contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[str]:
    """``bentoml serve`` on 127.0.0.1 with ``env``, its output in ``log``; yields its base URL."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", "aegan_serve.service:AEGAN"]
            + ["--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={**os.environ, "AEGAN_DEVICE": "cpu", "BENTOML_DO_NOT_TRACK": "True", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("not ready within 120 s")
            time.sleep(0.1)
        time.sleep(1.0)
        yield base
    finally:
        stop_group(process)


async def closed_loop(
    base: str, path: str, body: dict, keys: list[str | None], clients: int, seconds: float
) -> dict[str, Counter[str]]:
    """``clients`` clients, client i with key ``keys[i % len(keys)]``, each sending its next
    request when the last is answered, for ``seconds``: statuses per key."""
    by_key: dict[str, Counter[str]] = {str(k): Counter() for k in keys}
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + seconds

        async def client(i: int) -> None:
            key = keys[i % len(keys)]
            headers = {"X-API-Key": key} if key else {}
            while time.perf_counter() < deadline:
                try:
                    async with session.post(base + path, json=body, headers=headers) as answer:
                        await answer.read()
                        status = str(answer.status)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = type(exc).__name__
                by_key[str(key)][status] += 1
                if status == "429":  # a client that honours the answer waits before retrying
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return by_key


def overhead(folder: Path, rounds: int, seconds: float) -> dict[str, Any]:
    keys_file = folder / "overhead-keys.json"
    key = create_key(keys_file, "bench", ["generate"])
    settings = {
        "off": ({}, [None]),
        "on": (
            {
                "AEGAN_API_KEYS_FILE": str(keys_file),
                "AEGAN_QUOTA_REQUESTS_PER_S": "100000",
                "AEGAN_QUOTA_IMAGES_PER_S": "100000",
            },
            [key],
        ),
    }
    rates: dict[str, list[float]] = {"off": [], "on": []}
    statuses: dict[str, Counter[str]] = {"off": Counter(), "on": Counter()}
    for _ in range(rounds):
        for name, (env, keys) in settings.items():
            with serve(env, folder / f"overhead-{name}.log") as base:
                asyncio.run(closed_loop(base, "/sample", {"n": 1}, keys, 16, 2.0))  # warm-up
                by_key = asyncio.run(closed_loop(base, "/sample", {"n": 1}, keys, 16, seconds))
            counts = sum(by_key.values(), Counter())
            statuses[name] += counts
            rates[name].append(counts["200"] / seconds)
            print(f"  overhead {name:>3}: {rates[name][-1]:7.1f} req/s {dict(counts)}", flush=True)
    off, on = (sum(rates[n]) / len(rates[n]) for n in ("off", "on"))
    return {
        "rounds": rounds,
        "seconds_per_round": seconds,
        "req_per_s": rates,
        "statuses": {n: dict(c) for n, c in statuses.items()},
        "on_over_off": on / off,
        "cost_percent": 100 * (1 - on / off),
    }


def quotas(folder: Path, seconds: float, outage: float) -> dict[str, Any]:
    keys_file = folder / "quota-keys.json"
    keys = [create_key(keys_file, f"k{i}", ["generate"]) for i in range(KEYS)]
    redis = Redis(folder)
    redis.start()
    env = {
        "AEGAN_WORKERS": "2",
        "AEGAN_API_KEYS_FILE": str(keys_file),
        "AEGAN_RATE_LIMIT_STORAGE": redis.url,
        "AEGAN_RATE_LIMIT_FAILURE": "local",
        "AEGAN_QUOTA_REQUESTS_PER_S": str(RATE),
        "AEGAN_QUOTA_REQUESTS_BURST": str(BURST),
    }
    runs = {}
    try:
        with serve(env, folder / "quotas.log") as base:
            for name, down in (("redis", 0.0), ("redis-stopped", outage)):
                time.sleep(BURST / RATE + 1)  # a fresh window for every key
                events: list[str] = []
                if down:
                    start_at = (seconds - down) / 2

                    def outage_plan(
                        start_at: float = start_at, down: float = down, events: list = events
                    ) -> None:
                        time.sleep(start_at)
                        redis.stop()
                        events.append(f"redis killed at {start_at:.1f} s")
                        time.sleep(down)
                        redis.start()
                        events.append(f"redis started at {start_at + down:.1f} s")

                    threading.Thread(target=outage_plan, daemon=True).start()
                by_key = asyncio.run(closed_loop(base, "/sample", {"n": 1}, keys, CLIENTS, seconds))
                per_key = {}
                for i, key in enumerate(keys):
                    counts = by_key[key]
                    granted = counts["200"] / seconds
                    per_key[f"k{i}"] = {
                        "granted_per_s": granted,
                        "quota_per_s": RATE,
                        "ratio": granted / RATE,
                        "statuses": dict(counts),
                    }
                ratios = [v["ratio"] for v in per_key.values()]
                server_errors = sum(
                    n for c in by_key.values() for s, n in c.items() if not s.startswith(("2", "4"))
                )
                runs[name] = {
                    "events": events,
                    "per_key": per_key,
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "server_errors_or_failed_connections": server_errors,
                }
                print(
                    f"  quotas {name}: granted/quota per key {min(ratios):.3f}-{max(ratios):.3f}, "
                    f"5xx or failed connections {server_errors} {events}",
                    flush=True,
                )
    finally:
        redis.stop()
    return {
        "keys": KEYS,
        "clients": CLIENTS,
        "workers": 2,
        "quota": f"{RATE}/s, burst {BURST}",
        "seconds": seconds,
        "outage_s": outage,
        "note": "granted includes the first burst: over T seconds a key may get RATE*T + BURST",
        "runs": runs,
    }


def logs(folder: Path, count: int) -> dict[str, Any]:
    keys_file = folder / "log-keys.json"
    key = create_key(keys_file, "logger", ["generate"])
    log = folder / "logs.log"
    bad = [
        ("/generate", {"json": {"n": 1}}),
        ("/generate", {"json": {"n": 1}, "headers": {"X-API-Key": "aegan_wrong"}}),
        ("/encode", {"data": b"{}", "headers": {"X-API-Key": key}}),
        ("/generate", {"json": {"n": True}, "headers": {"X-API-Key": key}}),
        ("/decode", {"data": b"{", "headers": {"X-API-Key": key}}),
        ("/generate", {"data": b"x" * 2_000_000, "headers": {"X-API-Key": key}}),
        ("/nowhere", {"headers": {"X-API-Key": key}}),
    ]
    env = {"AEGAN_API_KEYS_FILE": str(keys_file), "AEGAN_AUTH_FAILURES_PER_MIN": "100000"}
    statuses: Counter[int] = Counter()
    with serve(env, log) as base:
        before = log.stat().st_size

        async def burst() -> None:
            async with aiohttp.ClientSession() as session:
                for i in range(count):
                    path, kwargs = bad[i % len(bad)]
                    async with session.post(base + path, **kwargs) as answer:
                        await answer.read()
                        statuses[answer.status] += 1

        started = time.perf_counter()
        asyncio.run(burst())
        seconds = time.perf_counter() - started
        time.sleep(1.0)
        written = log.read_bytes()[before:].decode(errors="replace").splitlines()
    refusals = [line for line in written if re.search(r"\] POST /\S* 4\d\d key=", line)]
    return {
        "requests": count,
        "seconds": seconds,
        "statuses": dict(statuses),
        "log_lines": len(written),
        "refusal_lines": len(refusals),
        "tracebacks": sum("Traceback" in line for line in written),
        "example_lines": refusals[: len(bad)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of each quota run")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds Redis is away")
    parser.add_argument("--rounds", type=int, default=3, help="off/on rounds of `overhead`")
    parser.add_argument("--overhead-seconds", type=float, default=10.0)
    parser.add_argument("--bad-requests", type=int, default=1000)
    parser.add_argument("--only", default="overhead,quotas,logs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench-access.json")
    args = parser.parse_args()
    parts = args.only.split(",")
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": {
            "cpus": available_cpus(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with tempfile.TemporaryDirectory(prefix="aegan-bench-access-") as tmp:
        folder = Path(tmp)
        if "overhead" in parts:
            report["overhead"] = overhead(folder, args.rounds, args.overhead_seconds)
        if "quotas" in parts:
            report["quotas"] = quotas(folder, args.duration, args.outage)
        if "logs" in parts:
            report["logs"] = logs(folder, args.bad_requests)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if "overhead" in report:
        print(f"overhead: on/off {report['overhead']['on_over_off']:.3f}")
    if "logs" in report:
        r = report["logs"]
        print(
            f"logs: {r['requests']} bad requests, {r['log_lines']} lines "
            f"({r['refusal_lines']} refusals), {r['tracebacks']} tracebacks"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
