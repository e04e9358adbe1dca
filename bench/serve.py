"""Serving benchmark: the BentoML service against a hand-written server and in-process work.

One command starts the real service (``bentoml serve``, the shipped bundle) and the hand-written
baseline (bench/baseline_server.py: Starlette + uvicorn, the same ONNX Runtime sessions and image
code), loads each with closed-loop concurrent clients (aiohttp; each client sends its next request
when the last one is answered) and measures, in the same run: throughput, p50/p95/p99 latency,
answers by status, wrong answers (``/encode`` latents are checked against in-process ones),
encoder batch sizes seen, resident memory of each process and the start-up time to ``/readyz``.

    .venv/bin/python bench/serve.py                    # about 12 minutes on 2 cores
    .venv/bin/python bench/serve.py --duration 3 --soak 10 --out /tmp/quick.json --no-docs

Writes docs/bench-serve.json, plots in docs/bench-serve/ and the serving section of
docs/BENCHMARKS.md (between its ``serve-bench`` markers).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # process_helpers

from process_helpers import stop_group  # noqa: E402

from aegan_core.bundle import DEFAULT_MODEL_DIR, load_bundle  # noqa: E402
from aegan_core.images import (  # noqa: E402
    encode_gif,
    encode_png,
    load_uploads,
    make_grid,
    png_base64,
    to_uint8,
)
from aegan_core.latents import interpolate, sample_prior  # noqa: E402
from aegan_core.runtime import ModelRuntime, available_cpus  # noqa: E402

BIN = Path(sys.executable).parent
FMNIST_TEST = "t10k-images-idx3-ubyte.gz"
BOUNDARY = "aeganbenchboundary"


# --- request bodies ------------------------------------------------------------------------------


def test_images(count: int) -> list[np.ndarray]:
    """Fashion-MNIST test images (28x28 uint8) when the dataset is installed, else noise."""
    for folder in (os.environ.get("AEGAN_FASHION_MNIST_DIR"), "/usr/share/datasets/fashion-mnist"):
        if folder and (Path(folder) / FMNIST_TEST).is_file():
            raw = gzip.decompress((Path(folder) / FMNIST_TEST).read_bytes())
            images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
            return list(images[:count])
    rng = np.random.default_rng(0)
    return list(rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))


def multipart(blobs: list[bytes]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + blob
        + b"\r\n"
        for i, blob in enumerate(blobs)
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


@dataclass
class Scenario:
    name: str  # e.g. "encode-1"
    path: str
    images: int  # images made or encoded per request (for images/s)
    concurrency: tuple[int, ...]
    body: Callable[[int], tuple[bytes, str, Any]]  # request index -> (body, content type, expect)
    check: Callable[[bytes, Any], bool] | None = None  # answer is right for ``expect``


def scenarios(pngs: list[bytes], latents: np.ndarray) -> list[Scenario]:
    def as_json(body: dict) -> tuple[bytes, str, Any]:
        return json.dumps(body).encode(), "application/json", None

    form = f"multipart/form-data; boundary={BOUNDARY}"
    batch64 = multipart(pngs[:64])
    batch8 = multipart(pngs[:8])

    def encode_one(i: int) -> tuple[bytes, str, Any]:
        k = i % len(pngs)
        return multipart([pngs[k]]), form, k

    def latent_is(answer: bytes, k: int) -> bool:
        got = np.asarray(json.loads(answer)["latents"][0], np.float32)
        return bool(np.allclose(got, latents[k], rtol=1e-4, atol=1e-4))

    return [
        Scenario(
            "sample-1", "/sample", 1, (1, 8, 16, 32, 64), lambda i: as_json({"n": 1, "seed": i})
        ),
        Scenario(
            "sample-64", "/sample", 64, (1, 2, 8, 32), lambda i: as_json({"n": 64, "seed": i})
        ),
        Scenario(
            "generate-64", "/generate", 64, (1, 8, 32), lambda i: as_json({"n": 64, "seed": i})
        ),
        Scenario("encode-1", "/encode", 1, (1, 8, 32, 64), encode_one, latent_is),
        Scenario("encode-64", "/encode", 64, (1, 8, 32), lambda i: (batch64, form, None)),
        Scenario("reconstruct-8", "/reconstruct", 8, (1, 8, 32), lambda i: (batch8, form, None)),
        Scenario(
            "interpolate-8",
            "/interpolate",
            8,
            (1, 8, 32),
            lambda i: as_json({"seeds": [i, i + 1], "steps": 8, "format": "gif"}),
        ),
    ]


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Load:
    requests: int = 0
    images: int = 0
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms or [math.nan])
        return {
            "requests": self.requests,
            "req_per_s": self.requests / self.seconds,
            "img_per_s": self.images / self.seconds,
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "statuses": dict(self.statuses),
            "shed": self.statuses.get("429", 0),  # refused under load, with Retry-After
            "errors": sum(v for k, v in self.statuses.items() if k not in ("200", "429")),
            "wrong": self.wrong,
        }


async def run_load(base: str, scenario: Scenario, concurrency: int, seconds: float) -> Load:
    """``concurrency`` clients, each sending its next request when the last one is answered."""
    load = Load()
    counter = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                body, content_type, expect = scenario.body(next(counter))
                started = time.perf_counter()
                try:
                    async with session.post(
                        base + scenario.path, data=body, headers={"Content-Type": content_type}
                    ) as response:
                        answer = await response.read()
                        status = str(response.status)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    answer, status = b"", type(exc).__name__
                load.latencies_ms.append((time.perf_counter() - started) * 1000)
                load.requests += 1
                load.statuses[status] += 1
                if status == "200":
                    load.images += scenario.images
                    if scenario.check is not None and not scenario.check(answer, expect):
                        load.wrong += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        load.seconds = time.perf_counter() - started
    return load


# --- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    base: str
    process: subprocess.Popen
    ready_s: float

    def rss_mib(self) -> dict[str, float]:
        """Resident memory of the server's processes (the bentoml arbiter and its workers)."""
        parent = psutil.Process(self.process.pid)
        found = {}
        for proc in [parent, *parent.children(recursive=True)]:
            try:
                cmd = " ".join(proc.cmdline())
                role = "worker" if "_bentoml_impl.worker" in cmd else "main"
                key = role if role not in found else f"{role}-{proc.pid}"
                found[key] = proc.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass
        return found

    def encoder_runs(self) -> tuple[float, float]:
        """(encoder runs, images encoded) so far, summed over all workers (from /metrics)."""
        import urllib.request

        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as answer:
            text = answer.read().decode()
        found = {}
        for line in text.splitlines():
            for key in ("count", "sum"):
                if line.startswith(f"aegan_encoder_batch_images_{key}"):
                    found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return found.get("count", 0.0), found.get("sum", 0.0)


@contextmanager
def start(
    name: str, command: list[str], env: dict[str, str], port: int, cwd: Path = REPO
) -> Iterator[Server]:
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        import urllib.error
        import urllib.request

        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}")
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - started > 120:
                raise RuntimeError(f"{name} not ready after 120 s")
            time.sleep(0.02)
        server = Server(name, base, process, time.perf_counter() - started)
        time.sleep(1.0)  # let start-up work settle before measuring idle memory
        yield server
    finally:
        stop_group(process)


def service(env: dict[str, str]) -> tuple[list[str], dict[str, str], int]:
    port = free_port()
    command = [str(BIN / "bentoml"), "serve", "aegan_serve.service:AEGAN", "--port", str(port)]
    return command, {"AEGAN_DEVICE": "cpu", "BENTOML_DO_NOT_TRACK": "True", **env}, port


def baseline(threads: int) -> tuple[list[str], dict[str, str], int]:
    port = free_port()
    command = [sys.executable, str(REPO / "bench" / "baseline_server.py"), "--port", str(port)]
    return command + ["--threads", str(threads)], {}, port


# --- in-process ----------------------------------------------------------------------------------


def in_process(model: ModelRuntime, pngs: list[bytes], seconds: float) -> dict[str, Any]:
    """The same work without HTTP, one call after another in this process."""
    dim, shape = model.bundle.latent_dim, model.bundle.data_shape

    def rate(work: Callable[[int], Any], images: int) -> dict[str, float]:
        work(0)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            work(count)
            count += 1
        elapsed = time.perf_counter() - started
        return {"req_per_s": count / elapsed, "img_per_s": count * images / elapsed}

    def sample(n: int) -> Callable[[int], bytes]:
        return lambda i: encode_png(make_grid(model.generate(sample_prior(n, dim, i))))

    def encode(blobs: list[bytes]) -> Callable[[int], Any]:
        limits = {"max_bytes": 1 << 30, "max_pixels": 1 << 30}
        return lambda i: model.encode(load_uploads(blobs, shape, **limits)).tolist()

    def generate(i: int) -> list[str]:
        return [png_base64(t) for t in to_uint8(model.generate(sample_prior(64, dim, i)))]

    def interpolation(i: int) -> bytes:
        ends = np.concatenate([sample_prior(1, dim, s) for s in (i, i + 1)])
        return encode_gif(model.generate(interpolate(ends[0], ends[1], 8, "slerp")))

    return {
        "sample-1": rate(sample(1), 1),
        "sample-64": rate(sample(64), 64),
        "generate-64": rate(generate, 64),
        "encode-1": rate(encode(pngs[:1]), 1),
        "encode-64": rate(encode(pngs[:64]), 64),
        "interpolate-8": rate(interpolation, 8),
    }


# --- the run -------------------------------------------------------------------------------------


def measure(server: Server, plan: list[tuple[Scenario, int]], seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {"ready_s": server.ready_s, "rss_idle_mib": server.rss_mib()}
    points = []
    for scenario, concurrency in plan:
        batching = server.name != "baseline" and scenario.path in ("/encode", "/reconstruct")
        before = server.encoder_runs() if batching else (0.0, 0.0)
        load = asyncio.run(run_load(server.base, scenario, concurrency, seconds))
        point = {"scenario": scenario.name, "concurrency": concurrency, **load.summary()}
        if batching:
            runs, images = (a - b for a, b in zip(server.encoder_runs(), before, strict=True))
            point["encoder_runs"] = runs
            point["mean_batch"] = images / max(runs, 1)
        point["latencies_ms"] = sorted(load.latencies_ms)[:: max(1, len(load.latencies_ms) // 400)]
        points.append(point)
        print(
            f"  {server.name:<24} {scenario.name:<14} c={concurrency:<3} "
            f"{point['img_per_s']:8.0f} img/s {point['req_per_s']:7.0f} req/s "
            f"p50 {point['p50_ms']:6.1f} p99 {point['p99_ms']:7.1f} ms "
            f"shed {point['shed']} errors {point['errors']} wrong {point['wrong']}"
            + (f" batch {point['mean_batch']:.1f}" if "mean_batch" in point else ""),
            flush=True,
        )
    results["rss_after_mib"] = server.rss_mib()
    results["points"] = points
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per load point")
    parser.add_argument("--soak", type=float, default=60.0, help="seconds of /encode at 32 clients")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench-serve.json")
    parser.add_argument("--no-docs", action="store_true", help="write no plots or BENCHMARKS.md")
    parser.add_argument(
        "--load-note", default="", help="what else ran on the machine (recorded with the figures)"
    )
    args = parser.parse_args()

    cpus = available_cpus()
    bundle = load_bundle(DEFAULT_MODEL_DIR)
    model = ModelRuntime(bundle, "cpu", cpus)
    images = test_images(256)
    pngs = [encode_png(image[..., None]) for image in images]
    limits = {"max_bytes": 1 << 30, "max_pixels": 1 << 30}
    latents = np.stack(
        [model.encode(load_uploads([p], bundle.data_shape, **limits))[0] for p in pngs]
    )
    plan = scenarios(pngs, latents)
    by_name = {s.name: s for s in plan}
    full = [(s, c) for s in plan for c in s.concurrency]

    report: dict[str, Any] = {
        "machine": {
            "cpus": cpus,
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "model": str(DEFAULT_MODEL_DIR.relative_to(REPO)),
        },
        "duration_s": args.duration,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": os.getloadavg()[0],
        "load_note": args.load_note or f"load average {os.getloadavg()[0]:.1f} at the start",
    }
    print("in-process", flush=True)
    report["in_process"] = in_process(model, pngs, args.duration)
    for name, figures in report["in_process"].items():
        print(f"  {name:<14} {figures['img_per_s']:8.0f} img/s {figures['req_per_s']:7.0f} req/s")
    del model

    small = [(by_name[n], c) for n in ("sample-1", "encode-1") for c in (1, 16, 32)]
    configs = [
        ("baseline", baseline(cpus), full),
        ("service", service({}), full),  # defaults: one worker per CPU, one thread each
        (
            "service-batching-off",
            service({"AEGAN_BATCH_SIZE": "1"}),
            [(by_name["encode-1"], c) for c in (8, 32)],
        ),
        (
            f"service-1-worker-{cpus}-threads",
            service({"AEGAN_WORKERS": "1"}),
            small + [(by_name[n], c) for n in ("sample-64", "encode-64") for c in (1, 8)],
        ),
        (
            "service-no-access-log",
            service({"BENTOML_CONFIG_OPTIONS": "services.aegan.logging.access.enabled=false"}),
            small,
        ),
    ]
    report["servers"] = {}
    for name, (command, env, port), points in configs:
        print(name, flush=True)
        with start(name, command, env, port) as server:
            report["servers"][name] = measure(server, points, args.duration)
            if name == "service" and args.soak > 0:
                print(f"  soak: /encode, 32 clients, {args.soak:g} s", flush=True)
                soak = measure(server, [(by_name["encode-1"], 32)], args.soak)
                report["servers"][name]["soak"] = soak["points"][0]
                report["servers"][name]["rss_after_mib"] = server.rss_mib()
        print(
            f"  ready after {report['servers'][name]['ready_s']:.2f} s, "
            f"idle RSS {report['servers'][name]['rss_idle_mib']}",
            flush=True,
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    if not args.no_docs:
        from serve_report import write_docs

        write_docs(report, REPO / "docs")


if __name__ == "__main__":
    main()
