"""Batch-encoding benchmark: ``aegan encode`` locally, ``aegan encode --ray`` on a Ray instance
started on this machine, and the service's HTTP ``/encode`` with concurrent clients, on the same
folder of Fashion-MNIST test images, in one run.

    .venv/bin/python bench/encode_collection.py                  # about 4 minutes on 2 cores
    .venv/bin/python bench/encode_collection.py --images 800 --repeats 1 --out /tmp/e.json --no-docs

Each repeat runs every way once, in turn, into a fresh output directory. ``aegan encode`` is run
as a user runs it (``python -m aegan_cli encode``, a new process): its images/s is the one it
prints, timed from the start of the job (the bundle's SHA-256 check and listing the folder) to the
last part written, worker or Ray start-up included; the whole command's time is recorded too.
``/encode`` is measured against a server already up (``bentoml serve``, the defaults: one worker
per CPU), with clients uploading the files in requests of ``--http-batch`` images; the answers are
checked against the local job's latents. The local job's process pool is also compared, in this
process, with threads sharing one ONNX Runtime session
(``aegan_batch.run_job(pool=...)``, timed the same way from ``plan_job``).

Every way is also set against the ceiling measured in the same run: a naive loop in this process
(decode over the CPUs' threads, then the encoder on batches of 512, nothing written). Ray runs
three ways: started by the command (``--ray``), already running in this process, and a one-node
cluster that ``ray start --head`` runs (``--ray-address``), the way a cluster is used.

    .venv/bin/python bench/encode_collection.py --images 10000 --out docs/bench-encode-10k.json
    .venv/bin/python bench/encode_collection.py --images 100000 --repeats 1 \
        --out docs/bench-encode-100k.json

Writes the JSON and the batch-encoding section of docs/BENCHMARKS.md for that many images
(between its ``encode-bench-N`` markers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image
from serve import multipart, service, start  # bench/serve.py: bentoml serve, its readiness

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aegan_batch import plan_job, run_job, run_job_on_ray  # noqa: E402
from aegan_core.bundle import DEFAULT_MODEL_DIR, load_bundle  # noqa: E402
from aegan_core.images import UploadLimits, load_uploads  # noqa: E402
from aegan_core.runtime import ModelRuntime, available_cpus  # noqa: E402

NAIVE_BATCH = 512  # the naive loop's encoder batch

FMNIST_TEST = "t10k-images-idx3-ubyte.gz"
SUMMARY = re.compile(r"(\d+) encoded, (\d+) errors, .* ([\d.]+) s, (\d+) images/s")
MARKERS = ("<!-- encode-bench:start -->", "<!-- encode-bench:end -->")


def write_collection(root: Path, count: int) -> list[Path]:
    """``count`` Fashion-MNIST test images as PNG files, 100 per folder; past the test split's
    10 000, its images again under new names (the same work per file)."""
    folder = os.environ.get("AEGAN_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist"
    raw = gzip.decompress((Path(folder) / FMNIST_TEST).read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    paths = []
    for i in range(count):
        path = root / f"{i // 100:04d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(path)
        paths.append(path)
    return paths


def load() -> float:
    return os.getloadavg()[0]


def cli_run(source: Path, dest: Path, extra: list[str]) -> dict[str, Any]:
    """``aegan encode`` in a new process; its own summary and the command's wall time."""
    command = [sys.executable, "-m", "aegan_cli", "encode", str(source), "--out", str(dest)]
    load_before, started = load(), time.perf_counter()
    result = subprocess.run(
        [*command, "--device", "cpu", "--no-progress", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"aegan encode {' '.join(extra)} failed:\n{result.stderr}")
    found = SUMMARY.search(result.stdout)
    assert found, result.stdout
    encoded, errors, seconds, _ = found.groups()
    return {
        "encoded": int(encoded),
        "errors": int(errors),
        "job_s": float(seconds),
        "img_per_s": (int(encoded) + int(errors)) / float(seconds),
        "command_s": wall,
        "command_img_per_s": (int(encoded) + int(errors)) / wall,
        "load_before": load_before,
        "load_after": load(),
    }


def pool_run(
    source: Path, dest: Path, pool: str, workers: int, batch: int, chunk: int
) -> dict[str, Any]:
    load_before = load()
    plan = plan_job(source, DEFAULT_MODEL_DIR, dest, chunk)
    summary = run_job(plan, workers=workers, batch_size=batch, device="cpu", pool=pool)  # type: ignore[arg-type]
    return job_result(summary, load_before)


def job_result(summary: Any, load_before: float) -> dict[str, Any]:
    """One timed job: what it encoded, its seconds and images/s, the load around it."""
    return {
        "encoded": summary.encoded,
        "errors": summary.errors,
        "job_s": summary.seconds,
        "img_per_s": summary.images_per_s,
        "load_before": load_before,
        "load_after": load(),
    }


def warm_ray_runs(
    source: Path, work: Path, args: argparse.Namespace
) -> tuple[float, list[dict[str, Any]]]:
    """Where the time of ``--ray`` goes: ``ray.init`` alone, then the job ``--repeats`` times on
    that running instance (``run_job_on_ray`` uses a Ray already initialised in its process)."""
    import logging

    import ray

    started = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=available_cpus(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    init_s = time.perf_counter() - started
    print(f"  ray.init alone: {init_s:.1f} s", flush=True)
    runs = []
    try:
        for repeat in range(args.repeats):
            load_before = load()
            plan = plan_job(source, DEFAULT_MODEL_DIR, work / f"ray-warm-{repeat}", args.chunk_size)
            summary = run_job_on_ray(
                plan,
                address=None,
                workers=args.workers,
                batch_size=args.batch_size,
                device="cpu",
            )
            runs.append(job_result(summary, load_before))
    finally:
        ray.shutdown()
    return init_s, runs


def naive_run(paths: list[Path], threads: int) -> dict[str, Any]:
    """The ceiling: what a user writes by hand in one process, with nothing kept on disk. Load
    the bundle, decode every file with the service's preprocessing over ``threads`` threads
    (Pillow releases the GIL), then run the ONNX encoder on batches of NAIVE_BATCH. Timed from
    the bundle's load to the last latent."""
    from concurrent.futures import ThreadPoolExecutor

    load_before, started = load(), time.perf_counter()
    bundle = load_bundle(DEFAULT_MODEL_DIR)
    model = ModelRuntime(bundle, "cpu", threads=available_cpus(), max_rows=NAIVE_BATCH)
    limits = UploadLimits()
    shape = bundle.data_shape
    assert len(shape) == 3

    def decode(part: list[Path]) -> np.ndarray:
        data = [p.read_bytes() for p in part]
        return load_uploads(
            data, shape, max_bytes=limits.max_upload_bytes, max_pixels=limits.max_pixels
        )

    step = max(1, len(paths) // (threads * 8))
    with ThreadPoolExecutor(threads) as pool:
        pixels = np.concatenate(
            list(pool.map(decode, [paths[i : i + step] for i in range(0, len(paths), step)]))
        )
    latents = [
        model.encode(pixels[i : i + NAIVE_BATCH]) for i in range(0, len(pixels), NAIVE_BATCH)
    ]
    seconds = time.perf_counter() - started
    assert sum(len(z) for z in latents) == len(paths)
    return {
        "encoded": len(paths),
        "errors": 0,
        "job_s": seconds,
        "img_per_s": len(paths) / seconds,
        "load_before": load_before,
        "load_after": load(),
    }


def cluster_runs(source: Path, work: Path, flags: list[str], repeats: int) -> list[dict[str, Any]]:
    """``aegan encode --ray-address`` on a one-node Ray cluster already running (``ray start
    --head`` with this machine's CPUs, its own temporary folder), ``repeats`` times: what a user
    of a running cluster sees. The cluster's start is not timed; it is stopped at the end."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_dir = tempfile.mkdtemp(prefix="aegan-ray-")  # short: Ray's socket paths are limited
    log = work / "ray-head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block"]
            + ["--num-cpus", str(available_cpus()), "--disable-usage-stats"]
            + ["--include-dashboard", "false", "--port", str(port), "--temp-dir", ray_dir],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    runs = []
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        for repeat in range(repeats):
            address = ["--ray-address", f"127.0.0.1:{port}"]
            runs.append(cli_run(source, work / f"cluster-{repeat}", [*flags, *address]))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
        shutil.rmtree(ray_dir, ignore_errors=True)
    return runs


def latents_of(dest: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(dest).to_pydict()
    return {i: np.asarray(z, np.float32) for i, z in zip(table["id"], table["latent"], strict=True)}


async def http_run(
    base: str, root: Path, paths: list[Path], clients: int, batch: int, expected: dict
) -> dict[str, Any]:
    """``clients`` clients take the next ``batch`` files, read and upload them, until all are
    encoded; every answer is checked against the local job's latents."""
    batches = [paths[i : i + batch] for i in range(0, len(paths), batch)]
    queue = iter(batches)
    wrong, statuses = 0, {}
    boundary = "aeganbenchboundary"
    timeout = aiohttp.ClientTimeout(total=300)
    load_before = load()
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            nonlocal wrong
            for files in queue:
                body = multipart([p.read_bytes() for p in files])
                async with session.post(
                    base + "/encode",
                    data=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                ) as response:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if response.status != 200:
                        raise RuntimeError(f"/encode answered {response.status}")
                    latents = (await response.json())["latents"]
                for path, z in zip(files, latents, strict=True):
                    key = path.relative_to(root).as_posix()
                    if np.abs(np.asarray(z, np.float32) - expected[key]).max() > 1e-5:
                        wrong += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {
        "encoded": len(paths),
        "seconds": seconds,
        "img_per_s": len(paths) / seconds,
        "wrong": wrong,
        "statuses": {str(k): v for k, v in statuses.items()},
        "load_before": load_before,
        "load_after": load(),
    }


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def write_docs(report: dict[str, Any], path: Path) -> None:
    m, r = report["machine"], report["results"]
    local, ray_run = r["aegan encode"], r.get("aegan encode --ray")
    http = r["http /encode"]
    ceiling = median(r["naive loop"], "img_per_s")
    markers = tuple(
        marker.replace("encode-bench", f"encode-bench-{report['images']}") for marker in MARKERS
    )

    def over(runs: list[dict[str, Any]]) -> str:
        return f"{median(runs, 'img_per_s') / ceiling:.2f}"

    lines = [
        markers[0],
        f"## Batch encoding, {report['images']} images (bench/encode_collection.py)",
        "",
        "```bash",
        f".venv/bin/python bench/encode_collection.py --images {report['images']} "
        f"--repeats {report['repeats']}",
        "```",
        "",
        f"{report['images']} Fashion-MNIST test images as PNG files in {report['images'] // 100}"
        f" folders, model `{m['model']}`, on {m['cpus']} CPUs ({m['processor']}), Python "
        f"{m['python']}, no GPU; started {report['started']}. Load average "
        f"{report['load_average_at_start']:.1f} at the start and "
        f"{report['load_average_at_end']:.1f} at the end (the benchmark's own processes count in "
        f"it; each run's is in {report['out']}); the ways were run in turn in each repeat, and "
        "the figures are medians over "
        f"{report['repeats']} repeats. `aegan encode` ran with {report['workers']} workers, "
        f"batches of {report['batch_size']} and parts of {report['chunk_size']} images; its "
        "images/s is the one it prints, timed from the start of the job (the bundle's SHA-256 "
        "check and listing the folder, worker or Ray start-up and the Parquet writes included); "
        '"whole command" adds the interpreter\'s start and imports. `/encode`: '
        f"`bentoml serve` with its defaults (one worker per CPU) already up, {report['clients']} "
        f"concurrent clients uploading {report['http_batch']} files per request; its answers "
        "were compared with the local job's latents (`wrong`: off by more than 1e-5).",
        "",
        "The ceiling is a naive loop in one process (bench/encode_collection.py `naive_run`): "
        f"the files decoded with the service's preprocessing over {m['cpus']} threads, then the "
        f"ONNX encoder on batches of {NAIVE_BATCH}, nothing written.",
        "",
        "| way | images/s | whole command, images/s | ratio to local | ratio to the naive loop |",
        "|---|---|---|---|---|",
        f"| naive loop (the ceiling) | {ceiling:.0f} | | "
        f"{ceiling / median(local, 'img_per_s'):.2f} | 1.00 |",
        f"| `aegan encode` ({report['workers']} threads, one session) | "
        f"{median(local, 'img_per_s'):.0f} | "
        f"{median(local, 'command_img_per_s'):.0f} | 1.00 | {over(local)} |",
    ]
    if ray_run:
        worst = max(run["max_abs_diff_to_local"] for run in ray_run)
        lines.append(
            f"| `aegan encode --ray` (Ray started by the command, {report['workers']} actors; "
            f"largest difference to the local latents {worst:.1g}) | "
            f"{median(ray_run, 'img_per_s'):.0f} | {median(ray_run, 'command_img_per_s'):.0f} | "
            f"{median(ray_run, 'img_per_s') / median(local, 'img_per_s'):.2f} | {over(ray_run)} |"
        )
    if "--ray, Ray running" in r:
        warm = r["--ray, Ray running"]
        lines.append(
            "| the `--ray` job on a Ray already running (called in the benchmark's process; each "
            f"run starts its actor pool) | {median(warm, 'img_per_s'):.0f} "
            f"| | {median(warm, 'img_per_s') / median(local, 'img_per_s'):.2f} | {over(warm)} |"
        )
    if "--ray-address, cluster running" in r:
        cluster = r["--ray-address, cluster running"]
        lines.append(
            f"| `aegan encode --ray-address` on a running one-node cluster (`ray start --head`, "
            f"{m['cpus']} CPUs) | {median(cluster, 'img_per_s'):.0f} | "
            f"{median(cluster, 'command_img_per_s'):.0f} | "
            f"{median(cluster, 'img_per_s') / median(local, 'img_per_s'):.2f} | {over(cluster)} |"
        )
    lines += [
        f"| HTTP `/encode`, {report['clients']} clients (server start-up not counted; wrong "
        f"answers: {sum(h['wrong'] for h in http)}) | {median(http, 'img_per_s'):.0f} | | "
        f"{median(http, 'img_per_s') / median(local, 'img_per_s'):.2f} | {over(http)} |",
        "",
        "Local pools called in one process (`run_job`, the same folder and settings): "
        f"{report['workers']} worker processes, one ONNX Runtime thread each: "
        f"{median(r['processes'], 'img_per_s'):.0f} images/s; {report['workers']} threads "
        f"sharing one session, {max(1, m['cpus'] // report['workers'])} intra-op thread(s) per "
        f"run: {median(r['threads'], 'img_per_s'):.0f} images/s.",
        "",
        *(
            [
                f"`ray.init` alone took {report['ray_init_s']:.1f} s; the runs on the running Ray"
                " took " + ", ".join(f"{w['job_s']:.1f}" for w in r["--ray, Ray running"]) + " s.",
                "",
            ]
            if "ray_init_s" in report
            else []
        ),
        markers[1],
    ]
    text = path.read_text()
    section = "\n".join(lines)
    if markers[0] in text:
        head, rest = text.split(markers[0], 1)
        text = head + section + rest.split(markers[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=available_cpus())
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--http-batch", type=int, default=64, help="files per /encode request")
    parser.add_argument("--no-ray", action="store_true", help="skip aegan encode --ray")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench-encode.json")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aegan-bench-encode-"))
    try:
        source = work / "images"
        paths = write_collection(source, args.images)
        flags = ["--workers", str(args.workers), "--batch-size", str(args.batch_size)]
        flags += ["--chunk-size", str(args.chunk_size)]
        report: dict[str, Any] = {
            "machine": {
                "cpus": available_cpus(),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "model": str(DEFAULT_MODEL_DIR.relative_to(REPO)),
            },
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_average_at_start": load(),
            "images": args.images,
            "repeats": args.repeats,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "chunk_size": args.chunk_size,
            "clients": args.clients,
            "http_batch": args.http_batch,
            "out": str(args.out.relative_to(REPO))
            if args.out.is_relative_to(REPO)
            else str(args.out),
        }
        print(f"{args.images} images in {source}; load average {load():.2f}", flush=True)
        results: dict[str, list[dict[str, Any]]] = {}

        def record(name: str, figures: dict[str, Any]) -> None:
            results.setdefault(name, []).append(figures)
            print(
                f"  {name:<22} {figures['img_per_s']:7.0f} images/s  (load average "
                f"{figures['load_before']:.2f} -> {figures['load_after']:.2f})",
                flush=True,
            )

        command, env, port = service({})
        with start("service", command, env, port) as server:
            for repeat in range(args.repeats):
                print(f"repeat {repeat + 1} of {args.repeats}", flush=True)
                record("naive loop", naive_run(paths, available_cpus()))
                local_dest = work / f"local-{repeat}"
                record("aegan encode", cli_run(source, local_dest, flags))
                expected = latents_of(local_dest)
                if not args.no_ray:
                    ray_run = cli_run(source, work / f"ray-{repeat}", [*flags, "--ray"])
                    got = latents_of(work / f"ray-{repeat}")
                    ray_run["max_abs_diff_to_local"] = max(
                        float(np.abs(got[k] - expected[k]).max()) for k in expected
                    )
                    record("aegan encode --ray", ray_run)
                figures = asyncio.run(
                    http_run(server.base, source, paths, args.clients, args.http_batch, expected)
                )
                record("http /encode", figures)
                for pool in ("processes", "threads"):
                    dest = work / f"{pool}-{repeat}"
                    figures = pool_run(
                        source, dest, pool, args.workers, args.batch_size, args.chunk_size
                    )
                    record(pool, figures)
        if not args.no_ray:
            report["ray_init_s"], runs = warm_ray_runs(source, work, args)
            for figures in runs:
                record("--ray, Ray running", figures)
            for figures in cluster_runs(source, work, flags, args.repeats):
                record("--ray-address, cluster running", figures)
        report["results"] = results
        report["load_average_at_end"] = load()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ceiling = median(results["naive loop"], "img_per_s")
    report["over_naive_loop"] = {
        name: round(median(runs, "img_per_s") / ceiling, 3) for name, runs in results.items()
    }
    for name, runs in results.items():
        print(
            f"{name:<32} median {median(runs, 'img_per_s'):7.0f} images/s, "
            f"{report['over_naive_loop'][name]:.2f}x the naive loop"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    if not args.no_docs:
        write_docs(report, REPO / "docs" / "BENCHMARKS.md")
        print("updated docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
