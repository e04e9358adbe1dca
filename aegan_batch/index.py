"""``aegan index``: a gallery built from an ``aegan encode`` output.

:func:`build_gallery` reads the Parquet parts of DEST (rows with an error are left out), checks
that they are whole and were encoded by the bundle given, builds an exact or approximate index
and writes the gallery files beside the parts (format: :mod:`aegan_core.gallery`).

pyarrow (extra ``batch``) and faiss-cpu are imported inside the functions that need them.
"""

from __future__ import annotations

import fcntl
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from aegan_core.bundle import ENCODER, Bundle
from aegan_core.files import TEMP_PREFIX, replace_file, write_atomic
from aegan_core.gallery import (
    APPROXIMATE,
    EXACT,
    INDEX_FILE,
    INDEX_VERSION,
    Ids,
    bundle_identity,
    exact_search,
    load_faiss,
)

from .inputs import JobError
from .job import JOB_FILE, LOCK_FILE, PART_NAME

# Galleries up to this many latents are searched exactly (numpy): at 32 values a latent, a query
# scans them in about a millisecond on one core; above, an approximate index (docs/SIMILAR.md).
EXACT_MAX_ROWS = 200_000
TARGET_RECALL = 0.95  # recall@10 against exact search the approximate index is tuned to reach
# The inverted file: about 4 sqrt(N) lists (k-means centroids), each of at least this many latents
# on average, trained on at most TRAIN_PER_LIST latents a list (a random sample).
MIN_PER_LIST = 39
TRAIN_PER_LIST = 64
# Lists searched per query, tried in order until recall@10 reaches TARGET_RECALL.
NPROBE_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)
RECALL_QUERIES = 1000  # gallery rows used as queries to measure recall@10

Kind = Literal["auto", "exact", "approximate"]


@dataclass(frozen=True)
class ReadGallery:
    """The encoded rows of an ``aegan encode`` output."""

    latents: np.ndarray  # (N, latent_dim) float32, rows without an error
    ids: list[str] | np.ndarray  # one per row: paths, or int64 row indices of an .npy source
    failed: int  # rows with an error, left out
    record: dict[str, Any]  # its _job.json


def read_encoded(dest: Path) -> ReadGallery:
    """The encoded rows of an ``aegan encode`` output (every part checked whole); rows with an
    error are left out."""
    ids, latents, errors, record = read_parts(dest)
    good = np.array([e is None for e in errors], bool)
    numeric = record.get("source_kind") == "npy"
    kept = [i for i, ok in zip(ids, good, strict=True) if ok]
    return ReadGallery(
        np.ascontiguousarray(latents[good]),
        np.asarray(kept, np.int64) if numeric else kept,
        int((~good).sum()),
        record,
    )


def read_parts(dest: Path) -> tuple[list[Any], np.ndarray, list[str | None], dict[str, Any]]:
    """Every row of an ``aegan encode`` output: (ids, latents (zeros where the input failed),
    errors, its ``_job.json``). Refuses an output that is not complete."""
    import pyarrow.parquet as pq

    if not (dest / JOB_FILE).is_file():
        raise JobError(f"{dest} holds no {JOB_FILE}: not the output of `aegan encode`")
    try:
        record = read_job_record(dest)
        inputs, chunk = int(record["inputs"]), int(record["chunk_size"])
        dim = int(record["latent_dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise JobError(f"{dest / JOB_FILE} is not readable ({exc})") from None
    ids: list[Any] = []
    errors: list[str | None] = []
    blocks = []
    for index in range(-(-inputs // chunk)):
        path = dest / PART_NAME.format(index)
        expected = min(chunk, inputs - index * chunk)
        if not path.is_file():
            raise JobError(
                f"{dest} is not complete: {path.name} is missing; run the same `aegan encode` "
                "again to finish it"
            )
        try:
            table = pq.read_table(path, columns=["id", "latent", "error"])
        except (OSError, ValueError) as exc:
            raise JobError(f"{path} is not a readable Parquet part ({exc})") from None
        if table.num_rows != expected:
            raise JobError(
                f"{path} holds {table.num_rows} rows, not {expected}; run the same `aegan "
                "encode` again to finish it"
            )
        column = table["latent"].combine_chunks()
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32)
        rows = np.zeros((len(valid), dim), np.float32)
        if values.size == valid.sum() * dim:  # flatten() left out the slots of null latents
            rows[valid] = values.reshape(-1, dim)
        else:
            rows[:] = values.reshape(-1, dim)
            rows[~valid] = 0
        blocks.append(rows)
        ids += table["id"].to_pylist()
        part_errors = table["error"].to_pylist()
        # a row without a latent is an error whatever its error column says
        errors += [
            e if ok else (e or "no latent") for e, ok in zip(part_errors, valid, strict=True)
        ]
    latents = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
    return ids, latents, errors, record


def read_job_record(dest: Path) -> dict[str, Any]:
    """The ``_job.json`` of an ``aegan encode`` output."""
    record: dict[str, Any] = json.loads((dest / JOB_FILE).read_text(encoding="utf-8"))
    return record


def check_encoded_by(record: dict[str, Any], bundle: Bundle, dest: Path) -> None:
    """Refuse an ``aegan encode`` output whose encoder is not the bundle's, naming both."""
    theirs = record.get("model", {})
    ours = bundle.sha256(ENCODER)
    if theirs.get("encoder_sha256") != ours:
        raise JobError(
            f"{dest} was encoded by model {theirs.get('name')!r} (encoder sha256 "
            f"{str(theirs.get('encoder_sha256'))[:12]}...), not by {bundle.name!r} at "
            f"{bundle.path} (encoder sha256 {ours[:12]}...); index it with the bundle it was "
            "encoded by, or encode it again with this one"
        )


# --- building -----------------------------------------------------------------------------------


def recall_at_10(
    latents: np.ndarray, search: Callable[[np.ndarray, int], np.ndarray], seed: int = 0
) -> float:
    """Recall@10 of ``search`` (queries, k) -> rows against exact search, on up to
    :data:`RECALL_QUERIES` gallery rows as queries, each one's own row left out of both lists."""
    return RecallCheck(latents, seed).recall(search)


class RecallCheck:
    """The exact 10 nearest neighbours of sampled gallery rows (each one's own row left out),
    found once, to measure any number of searches against."""

    def __init__(self, latents: np.ndarray, seed: int = 0) -> None:
        n = len(latents)
        self.picked = np.random.default_rng(seed).choice(n, min(n, RECALL_QUERIES), replace=False)
        self.queries = np.ascontiguousarray(latents[self.picked])
        norms = np.einsum("ij,ij->i", latents, latents)
        self.truth: list[list[int]] = []
        for start in range(0, len(self.queries), 256):
            rows, scores = exact_search(latents, norms, self.queries[start : start + 256], 11)
            rows = np.take_along_axis(rows, np.argsort(scores, axis=1), 1)
            own = self.picked[start : start + 256].tolist()
            for row, o in zip(rows.tolist(), own, strict=True):
                self.truth.append([r for r in row if r != o][:10])

    def recall(self, search: Callable[[np.ndarray, int], np.ndarray]) -> float:
        found = 0
        for start in range(0, len(self.queries), 256):
            got = search(self.queries[start : start + 256], 11)
            for k, row in enumerate(got.tolist()):
                i = start + k
                found += len(set(self.truth[i]) & (set(row) - {int(self.picked[i])}))
        return found / sum(len(t) for t in self.truth)


def ivf_lists(size: int) -> int:
    """Lists of the inverted file of ``size`` latents: 4 sqrt(N), with at least
    :data:`MIN_PER_LIST` latents a list on average."""
    return max(1, min(round(4 * math.sqrt(size)), size // MIN_PER_LIST))


def build_ivf(latents: np.ndarray, threads: int) -> tuple[Any, int, float]:
    """faiss IVF-Flat over ``latents``, and the fewest lists searched of :data:`NPROBE_STEPS`
    whose recall@10 reaches :data:`TARGET_RECALL` (all lists, which is exact, if none does):
    (index, nprobe, recall)."""
    faiss = load_faiss()
    faiss.omp_set_num_threads(threads)
    lists = ivf_lists(len(latents))
    index = faiss.index_factory(latents.shape[1], f"IVF{lists},Flat")
    rng = np.random.default_rng(0)
    sample = min(len(latents), TRAIN_PER_LIST * lists)
    index.train(np.ascontiguousarray(latents[np.sort(rng.choice(len(latents), sample, False))]))
    index.add(latents)
    check = RecallCheck(latents)
    recall = 0.0
    for nprobe in [*(p for p in NPROBE_STEPS if p < lists), lists]:
        params = faiss.SearchParametersIVF(nprobe=nprobe)

        def search(queries: np.ndarray, k: int, params: Any = params) -> np.ndarray:
            rows: np.ndarray = index.search(queries, k, params=params)[1]
            return rows

        recall = check.recall(search)
        if recall >= TARGET_RECALL:
            break
    return index, nprobe, recall


@dataclass(frozen=True)
class IndexSummary:
    dest: Path
    size: int
    failed: int
    kind: str
    recall_at_10: float | None
    nprobe: int | None
    seconds: float  # build of the index
    total_seconds: float  # reading the parts and writing the files included


def build_gallery(
    dest: Path,
    bundle: Bundle,
    *,
    kind: Kind = "auto",
    threads: int = 1,
    log: Callable[[str], None] = lambda message: None,
) -> IndexSummary:
    """Index the ``aegan encode`` output DEST for ``bundle`` and write the gallery files beside its
    parts, replacing an earlier gallery whole. ``kind``: ``auto`` is exact up to
    :data:`EXACT_MAX_ROWS` latents and approximate above."""
    started = time.perf_counter()
    dest = Path(dest)
    if not dest.is_dir():
        raise JobError(f"{dest} is not a directory (the --out of `aegan encode`)")
    with open(dest / LOCK_FILE, "ab") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(
                f"{dest} is in use (an `aegan encode` or `aegan index` holds {dest / LOCK_FILE});"
                " wait for it to finish"
            ) from None
        if (dest / JOB_FILE).is_file():
            check_encoded_by(read_job_record(dest), bundle, dest)
        read = read_encoded(dest)
        log(f"{dest}: {len(read.latents)} latents ({read.failed} inputs with an error left out)")
        chosen = (
            kind
            if kind != "auto"
            else ("approximate" if len(read.latents) > EXACT_MAX_ROWS else "exact")
        )
        if chosen == "approximate" and len(read.latents) < 2:
            chosen = "exact"
        built = time.perf_counter()
        index, nprobe, recall = (None, None, None)
        if chosen == "approximate":
            log(f"building the inverted-file index of {len(read.latents)} latents")
            index, nprobe, recall = build_ivf(read.latents, threads)
        seconds = time.perf_counter() - built
        write_gallery(dest, bundle, read, index, nprobe, recall, seconds)
    return IndexSummary(
        dest,
        len(read.latents),
        read.failed,
        APPROXIMATE if index is not None else EXACT,
        recall,
        nprobe,
        seconds,
        time.perf_counter() - started,
    )


def write_gallery(
    dest: Path,
    bundle: Bundle,
    read: ReadGallery,
    index: Any,
    nprobe: int | None,
    recall: float | None,
    seconds: float,
) -> None:
    """The gallery's data files under a new tag, then ``_index.json`` atomically, then the files of
    earlier builds removed."""
    from aegan_core.bundle import sha256_file

    tag = secrets.token_hex(4)
    ids = Ids.build(read.ids)
    arrays = {"latents": read.latents, "ids": ids.values, "order": ids.order}
    if ids.offsets is not None:
        arrays["offsets"] = ids.offsets
    files: dict[str, dict[str, Any]] = {}
    for role, array in arrays.items():
        path = dest / f"_index-{tag}.{role}.npy"

        def save(f: BinaryIO, array: np.ndarray = array) -> None:
            np.save(f, array, allow_pickle=False)

        replace_file(path, save)
        files[role] = {"path": path.name}
    if index is not None:
        faiss = load_faiss()
        path = dest / f"_index-{tag}.faiss"
        data = faiss.serialize_index(index)
        replace_file(path, lambda f: f.write(data.tobytes()))
        files["index"] = {"path": path.name}
    for entry in files.values():
        path = dest / entry["path"]
        entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    record = {
        "format_version": INDEX_VERSION,
        "kind": APPROXIMATE if index is not None else EXACT,
        "size": len(read.latents),
        "skipped": read.failed,
        "latent_dim": int(read.latents.shape[1]),
        "bundle": bundle_identity(bundle),
        "job": {
            key: read.record.get(key)
            for key in ("source", "inputs", "names_sha256", "contents_sha256")
        },
        "recall_at_10": None if recall is None else round(recall, 4),
        "search": None if index is None else {"nlist": int(index.nlist), "nprobe": nprobe},
        "build_seconds": round(seconds, 2),
        "files": files,
    }
    write_atomic(dest / INDEX_FILE, (json.dumps(record, indent=2) + "\n").encode())
    keep = {entry["path"] for entry in files.values()}
    for old in dest.glob("_index-*"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    for stale in dest.glob(f"{TEMP_PREFIX}*"):
        if stale.name.endswith(".npy") or stale.name.endswith(".faiss"):
            stale.unlink(missing_ok=True)


# --- aegan similar ------------------------------------------------------------------------------
