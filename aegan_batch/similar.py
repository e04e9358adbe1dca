"""``aegan similar``: many queries searched in a gallery (:mod:`aegan_batch.index` builds it).

:func:`run_similar` encodes a folder of images (the service's preprocessing, as ``aegan encode``)
or reads an ``aegan encode`` output, and writes each query's neighbours to Parquet.

pyarrow (extra ``batch``) is imported inside the functions that need it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aegan_core.bundle import Bundle
from aegan_core.files import replace_file
from aegan_core.gallery import (
    Gallery,
    load_gallery,
)

from .index import read_parts
from .inputs import JobError
from .job import JOB_FILE


def similar_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("neighbours", pa.list_(pa.string())),
            pa.field("distances", pa.list_(pa.float32())),
            pa.field("error", pa.string()),
        ]
    )


@dataclass(frozen=True)
class SimilarSummary:
    queries: int
    searched: int
    errors: int
    seconds: float


def write_similar(
    out: Path,
    gallery: Gallery,
    ids: Sequence[str],
    latents: np.ndarray,
    errors: Sequence[str | None],
    k: int,
    batch: int = 1024,
) -> SimilarSummary:
    """Search each query's ``k`` neighbours and write one Parquet file (atomically): columns
    ``id``, ``neighbours`` (gallery ids, nearest first), ``distances`` and ``error``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    neighbours: list[list[str] | None] = [None] * len(ids)
    distances: list[list[float] | None] = [None] * len(ids)
    good = [i for i, e in enumerate(errors) if e is None]
    for start in range(0, len(good), batch):
        rows = good[start : start + batch]
        d, found = gallery.search(latents[rows], k)
        for i, ds, rs in zip(rows, d.tolist(), found.tolist(), strict=True):
            neighbours[i] = [gallery.ids[r] for r in rs]
            distances[i] = ds
    table = pa.Table.from_arrays(
        [
            pa.array([str(i) for i in ids], pa.string()),
            pa.array(neighbours, pa.list_(pa.string())),
            pa.array(distances, pa.list_(pa.float32())),
            pa.array(list(errors), pa.string()),
        ],
        schema=similar_schema(),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, lambda f: pq.write_table(table, f), suffix=".parquet")
    return SimilarSummary(len(ids), len(good), len(ids) - len(good), time.perf_counter() - started)


def load_queries(queries: Path, gallery: Gallery) -> tuple[list[str], np.ndarray, list[str | None]]:
    """The queries of an ``aegan encode`` output, encoded by the gallery's encoder: (ids,
    latents, errors)."""
    ids, latents, errors, record = read_parts(queries)
    model = record.get("model", {})
    if model.get("encoder_sha256") != gallery.record["bundle"]["encoder_sha256"]:
        raise JobError(
            f"{queries} was encoded by model {model.get('name')!r} (encoder sha256 "
            f"{str(model.get('encoder_sha256'))[:12]}...), the gallery by "
            f"{gallery.record['bundle']['name']!r} (encoder sha256 "
            f"{gallery.record['bundle']['encoder_sha256'][:12]}...): their latents cannot be "
            "compared"
        )
    return [str(i) for i in ids], latents, errors


def run_similar(
    queries: Path,
    gallery_dest: Path,
    out: Path,
    *,
    k: int,
    model: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    ray: bool = False,
    ray_address: str | None = None,
) -> SimilarSummary:
    """``aegan similar``: the queries' latents (read from an ``aegan encode`` output, or encoded
    here from anything ``aegan encode`` takes, with the gallery's bundle, locally or on Ray Data,
    into a temporary output beside ``out``), searched in the gallery, written to ``out``."""
    import tempfile

    from aegan_core.bundle import DEFAULT_MODEL_DIR, load_bundle, resolve_bundle_dir
    from aegan_core.gallery import GalleryError, check_bundle

    from .job import plan_job
    from .local import default_workers, run_job
    from .on_ray import run_job_on_ray

    started = time.perf_counter()
    gallery = open_gallery(gallery_dest)
    if out.exists() and out.is_dir():
        raise JobError(f"{out} is a directory; --out names a Parquet file")
    if (queries / JOB_FILE).is_file():
        ids, latents, errors = load_queries(queries, gallery)
    else:
        bundle = load_bundle(resolve_bundle_dir(model or DEFAULT_MODEL_DIR))
        try:
            check_bundle(gallery.record, bundle, gallery.path)
        except GalleryError as exc:
            raise JobError(str(exc)) from None
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".aegan-similar-", dir=out.parent) as tmp:
            encoded = Path(tmp) / "queries.parquet"
            plan = plan_job(queries, bundle.path, encoded, chunk_size=1000)
            try:
                if ray:
                    run_job_on_ray(
                        plan, address=ray_address, workers=workers, batch_size=None, device=device
                    )
                else:
                    run_job(
                        plan,
                        workers=workers or default_workers(device, "threads"),
                        batch_size=256,
                        device=device,
                        pool="threads",
                    )
            finally:
                plan.release()
            ids, latents, errors = load_queries(encoded, gallery)
    summary = write_similar(out, gallery, ids, latents, errors, k)
    return SimilarSummary(
        summary.queries, summary.searched, summary.errors, time.perf_counter() - started
    )


def open_gallery(dest: Path, bundle: Bundle | None = None) -> Gallery:
    from aegan_core.gallery import GalleryError

    try:
        return load_gallery(dest, bundle)
    except GalleryError as exc:
        raise JobError(str(exc)) from None
