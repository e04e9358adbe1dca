"""Similarity-search benchmark: a Fashion-MNIST gallery searched over HTTP, the latents' same-class
precision beside a PCA of their size, and an approximate index over a million synthetic latents.

    .venv/bin/python bench/similar.py                   # the figures of docs/SIMILAR.md
    .venv/bin/python bench/similar.py --quick --out /tmp/similar.json   # a check, in a minute

Fashion-MNIST (``--gallery-images``, default the 60 000 training images; the shipped bundle):

- the training images go through ``aegan encode`` (an ``.npy`` of the images as the source, the
  service's encoder) and ``aegan index`` (exact below 200 000 latents), as a user builds a gallery;
- ``/similar`` with one uploaded PNG test image and k=10, sequential requests on one kept-alive
  connection to ``bentoml serve`` (``AEGAN_GALLERY`` set, the service's defaults otherwise):
  latency p50/p90/p99, beside ``/encode`` of the same uploads on the same server (what the upload
  alone costs), both after a warm-up;
- same-class precision@10 of the test images (``--test-images``, default 10 000): the share of
  each one's 10 nearest gallery images with its label, from the gallery's search; beside the same
  figure for a PCA of the latent's size fitted on the training pixels (in [0, 1]), searched
  exactly the same way.

Synthetic (``--synthetic``, default 1 000 000 standard-normal latents of the bundle's size, the
hardest case for an index: no clusters to exploit): the inverted-file index ``aegan index``
builds above its threshold, through the same code (``build_ivf``, the files written and loaded
back): build time, the lists it searches a query (nprobe) and the recall@10 against exact search
it records, query p50 in-process one query at a time (``Gallery.search``: the index's
candidates and their exact distances), and the index's size beside the raw latents'
(N x latent_dim float32).

Prints the machine and its load average; writes ``--out`` (default docs/bench-similar.json).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from serve import multipart, service, start  # bench/serve.py: bentoml serve, its readiness

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aegan_batch import plan_job, run_job  # noqa: E402
from aegan_batch.index import ReadGallery, build_gallery, build_ivf, write_gallery  # noqa: E402
from aegan_core.bundle import DEFAULT_MODEL_DIR, load_bundle  # noqa: E402
from aegan_core.gallery import exact_search, load_gallery  # noqa: E402
from aegan_core.runtime import ModelRuntime, available_cpus  # noqa: E402

BOUNDARY = "aeganbenchboundary"  # bench/serve.py's multipart boundary


def fmnist(split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(os.environ.get("AEGAN_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
    prefix = "train" if split == "train" else "t10k"
    images = np.frombuffer(
        gzip.decompress((folder / f"{prefix}-images-idx3-ubyte.gz").read_bytes()),
        np.uint8,
        offset=16,
    ).reshape(-1, 28, 28)[:count]
    labels = np.frombuffer(
        gzip.decompress((folder / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()),
        np.uint8,
        offset=8,
    )[:count]
    return images, labels


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "requests": len(ms),
    }


def precision_at_10(
    gallery_latents: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray
) -> float:
    """Share of each query's 10 exact nearest gallery rows that have its label."""
    norms = np.einsum("ij,ij->i", gallery_latents, gallery_latents)
    hits = 0
    for first in range(0, len(queries), 256):
        rows, _ = exact_search(gallery_latents, norms, queries[first : first + 256], 10)
        hits += int((gallery_labels[rows] == labels[first : first + 256, None]).sum())
    return hits / (10 * len(queries))


def pca(train: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the ``dim`` leading principal axes (dim, D) of ``train`` (N, D)."""
    mean = train.mean(0)
    centred = train - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / len(train))
    return mean, vectors[:, np.argsort(values)[::-1][:dim]].T


# --- Fashion-MNIST -------------------------------------------------------------------------------


def fashion_mnist(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundle = load_bundle(DEFAULT_MODEL_DIR)
    train, train_labels = fmnist("train", args.gallery_images)
    test, test_labels = fmnist("test", args.test_images)
    np.save(work / "train.npy", train[:, None])  # N x 1 x 28 x 28 uint8: aegan encode's .npy
    dest = work / "gallery"
    started = time.perf_counter()
    plan = plan_job(work / "train.npy", DEFAULT_MODEL_DIR, dest, 5000)
    try:
        run_job(plan, workers=available_cpus(), batch_size=256, device="cpu", pool="threads")
    finally:
        plan.release()
    encode_s = time.perf_counter() - started
    summary = build_gallery(dest, bundle)
    gallery = load_gallery(dest, bundle)
    print(f"gallery: {gallery.size} latents, encoded in {encode_s:.1f} s, {summary.kind}")

    # Same-class precision@10: the encoder's latents and a PCA of the same size.
    model = ModelRuntime(bundle, "cpu", available_cpus())
    queries = np.concatenate(
        [
            model.encode(test[i : i + 512, None].astype(np.float32) / 127.5 - 1.0)
            for i in range(0, len(test), 512)
        ]
    )
    _, rows = gallery.search(queries, 10)
    ids = np.array([[int(gallery.ids[r]) for r in row] for row in rows])
    encoder_precision = float((train_labels[ids] == test_labels[:, None]).mean())
    pixels = train.reshape(len(train), -1).astype(np.float32) / 255
    mean, axes = pca(pixels, bundle.latent_dim)
    projected = ((pixels - mean) @ axes.T).astype(np.float32)
    test_projected = ((test.reshape(len(test), -1) / 255 - mean) @ axes.T).astype(np.float32)
    pca_precision = precision_at_10(projected, train_labels, test_projected, test_labels)
    print(
        f"precision@10: encoder {encoder_precision:.4f}, "
        f"PCA-{bundle.latent_dim} {pca_precision:.4f}"
    )

    # /similar over HTTP, one upload per request, beside /encode of the same uploads.
    pngs = []
    for image in test[: args.requests]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    command, env, port = service({"AEGAN_GALLERY": str(dest)})
    latency = {}
    with start("similar", command, env, port) as server:
        host = server.base.removeprefix("http://")
        connection = http.client.HTTPConnection(host, timeout=60)
        content_type = f"multipart/form-data; boundary={BOUNDARY}"
        for route in ("/similar", "/encode"):
            timings = []
            for i, png in enumerate([*pngs[: args.warmup], *pngs]):
                body = multipart([png])
                started = time.perf_counter()
                connection.request("POST", route, body, {"Content-Type": content_type})
                answer = connection.getresponse()
                data = answer.read()
                elapsed = time.perf_counter() - started
                if answer.status != 200:
                    raise RuntimeError(f"{route}: {answer.status} {data[:300]!r}")
                if i >= args.warmup:
                    timings.append(elapsed)
            latency[route] = percentiles(timings)
            print(f"{route}: {latency[route]}")
        connection.close()
    return {
        "gallery_images": int(gallery.size),
        "test_images": len(test),
        "encode_seconds": round(encode_s, 1),
        "index_kind": summary.kind,
        "precision_at_10": {
            "encoder": round(encoder_precision, 4),
            f"pca_{bundle.latent_dim}": round(pca_precision, 4),
        },
        "http_one_upload_k10": latency,
    }


# --- synthetic -----------------------------------------------------------------------------------


def synthetic(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundle = load_bundle(DEFAULT_MODEL_DIR)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((args.synthetic, bundle.latent_dim), dtype=np.float32)
    started = time.perf_counter()
    index, nprobe, recall = build_ivf(latents, available_cpus())
    build_s = time.perf_counter() - started
    dest = work / "synthetic"
    dest.mkdir()
    read = ReadGallery(latents, np.arange(len(latents), dtype=np.int64), 0, {})
    write_gallery(dest, bundle, read, index, nprobe, recall, build_s)
    del index
    gallery = load_gallery(dest, bundle, threads=1)
    index_bytes = (dest / gallery.record["files"]["index"]["path"]).stat().st_size
    queries = rng.standard_normal((args.queries, bundle.latent_dim), dtype=np.float32)
    timings = []
    for q in queries:
        t = time.perf_counter()
        gallery.search(q[None], 10)
        timings.append(time.perf_counter() - t)
    result = {
        "latents": len(latents),
        "latent_dim": bundle.latent_dim,
        "build_seconds": round(build_s, 1),
        "build_threads": available_cpus(),
        "nlist": gallery.record["search"]["nlist"],
        "nprobe": nprobe,
        "recall_at_10": round(recall, 4),
        "query": percentiles(timings),
        "index_bytes": index_bytes,
        "raw_latent_bytes": int(latents.nbytes),
        "index_over_raw": round(index_bytes / latents.nbytes, 3),
    }
    print(f"synthetic: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery-images", type=int, default=60_000)
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=500, help="/similar requests timed")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="synthetic latents")
    parser.add_argument("--queries", type=int, default=2000, help="synthetic queries timed")
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that it runs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench-similar.json")
    args = parser.parse_args()
    if args.quick:
        args.gallery_images, args.test_images, args.requests = 3000, 500, 50
        args.synthetic, args.queries, args.warmup = 20_000, 200, 5
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="aegan-bench-similar-"))
    try:
        report = {
            "machine": {
                "cpus": available_cpus(),
                "processor": platform.processor() or platform.machine(),
                "load_average_at_start": os.getloadavg(),
            },
            "fashion_mnist": fashion_mnist(args, work),
            "synthetic": synthetic(args, work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
