"""A job checked against DEST: its record (``_job.json``) and lock, the Parquet parts, and the one
chunk -> batches -> part path that the local and the Ray executors share."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from aegan_core.bundle import ENCODER, Bundle, load_bundle, resolve_bundle_dir
from aegan_core.files import TEMP_PREFIX, replace_file, write_atomic
from aegan_core.images import UploadLimits

from .inputs import (
    IMAGE_SUFFIXES,
    Inputs,
    Item,
    JobError,
    Reader,
    list_inputs,
    printable,
    reader_for,
)

JOB_FILE = "_job.json"
JOB_VERSION = 2  # 2: the inputs' sizes and modification times are part of the job
LOCK_FILE = "_job.lock"  # locked (flock) by the run writing DEST
PART_NAME = "part-{:05d}.parquet"
SHOWN_ERRORS = 10  # errors kept in the summary (all of them are in the error column)


@dataclass(frozen=True)
class JobPlan:
    """A job checked against DEST: what to read, with which model, and which parts are missing.
    It holds DEST's lock (:data:`LOCK_FILE`) until :meth:`release` or until it is freed."""

    inputs: Inputs
    bundle: Bundle
    dest: Path
    chunk_size: int
    missing: list[int]  # chunk indices whose part is not written yet (or not whole)
    record: dict[str, Any]
    started: float = 0.0  # time.perf_counter() when plan_job began: a job's time counts from it
    lock: Any = field(default=None, repr=False, compare=False)  # the open, locked lock file

    @property
    def parts(self) -> int:
        return -(-len(self.inputs) // self.chunk_size)

    def chunk(self, index: int) -> range:
        return range(index * self.chunk_size, min((index + 1) * self.chunk_size, len(self.inputs)))

    @property
    def pending_inputs(self) -> int:
        return sum(len(self.chunk(i)) for i in self.missing)

    def reader(self, limits: UploadLimits = UploadLimits()) -> Reader:
        return reader_for(self.inputs, self.bundle, limits)

    def items(self, rows: range) -> list[Item]:
        return [(str(self.inputs.id(i)), self.inputs.location(i)) for i in rows]

    def release(self) -> None:
        """Unlock DEST (closing the lock file does it)."""
        if self.lock is not None:
            self.lock.close()


@dataclass
class JobSummary:
    inputs: int  # in SOURCE
    parts: int  # in DEST when the job is complete
    skipped: int  # inputs of parts written by an earlier run
    encoded: int  # by this run
    errors: int  # inputs of this run that could not be encoded
    seconds: float  # this run: listing SOURCE and checking the model and DEST included
    error_examples: list[tuple[str, str]] = field(default_factory=list)  # (id, message), a few
    providers: set[str] = field(default_factory=set)  # ONNX Runtime providers that encoded

    @property
    def images_per_s(self) -> float:
        return (self.encoded + self.errors) / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def start(cls, plan: JobPlan) -> JobSummary:
        """A run's summary before it encodes anything: the parts written earlier count as
        skipped."""
        return cls(
            inputs=len(plan.inputs),
            parts=plan.parts,
            skipped=len(plan.inputs) - plan.pending_inputs,
            encoded=0,
            errors=0,
            seconds=0.0,
        )


def plan_job(
    source: str | os.PathLike[str], model: str | os.PathLike[str], dest: Path, chunk_size: int
) -> JobPlan:
    """Load the model, list SOURCE and check DEST: a new job records itself in ``_job.json``; an
    earlier run of the same job on the same inputs keeps its whole parts; another job's DEST, or
    inputs changed since, are refused. DEST stays locked against other runs while the plan
    lives."""
    import pyarrow  # noqa: F401  (fail before any work when the 'batch' extra is missing)

    started = time.perf_counter()
    if chunk_size < 1:
        raise JobError(f"chunk size must be at least 1, got {chunk_size}")
    bundle = load_bundle(resolve_bundle_dir(model))  # verifies the SHA-256 of every graph
    inputs = list_inputs(source, bundle, chunk_size)
    if not len(inputs):
        kinds = ", ".join(IMAGE_SUFFIXES)
        raise JobError(f"{source}: no inputs found (a folder is searched for {kinds})")
    record = {
        "format_version": JOB_VERSION,
        "source": str(inputs.source),
        "source_kind": inputs.kind,
        "inputs": len(inputs),
        "names_sha256": inputs.names_sha256,
        "contents_sha256": inputs.contents_sha256,
        **({"array": inputs.array} if inputs.array is not None else {}),
        **({"parts_sha256": inputs.parts_sha256} if inputs.parts_sha256 is not None else {}),
        "chunk_size": chunk_size,
        "model": {
            "name": bundle.name,
            "encoder_sha256": bundle.sha256(ENCODER),
        },
        "latent_dim": bundle.latent_dim,
        "bundle_path": str(bundle.path),
    }
    lock = _claim_dest(dest, record)
    try:
        plan = JobPlan(inputs, bundle, dest, chunk_size, [], record, started, lock)
        missing = [i for i in range(plan.parts) if not part_is_whole(plan, i)]
    except BaseException:
        lock.close()
        raise
    return dataclasses.replace(plan, missing=missing)


def part_is_whole(plan: JobPlan, index: int) -> bool:
    """Whether chunk ``index`` has its part, with one row per input of the chunk (a part that is
    not, or not a readable Parquet file, is written again)."""
    import pyarrow.parquet as pq

    path = plan.dest / PART_NAME.format(index)
    if not path.is_file():
        return False
    try:
        return bool(pq.read_metadata(path).num_rows == len(plan.chunk(index)))
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return False


_DIFFERENCES = {
    "source": "source",
    "source_kind": "kind of source",
    "inputs": "number of inputs",
    "names_sha256": "names of the inputs",
    "chunk_size": "chunk size (--chunk-size)",
    "model": "model (--model)",
}


def _claim_dest(dest: Path, record: dict[str, Any]) -> BinaryIO:
    """Lock DEST and check or write its ``_job.json``; the locked lock file."""
    if dest.exists() and not dest.is_dir():
        raise JobError(f"{dest} is a file; --out names a directory of Parquet parts")
    job_file = dest / JOB_FILE
    if not job_file.is_file() and _foreign_files(dest):  # before a lock file is left there
        raise JobError(f"{dest} is not empty and holds no {JOB_FILE}; use a new or empty --out")
    dest.mkdir(parents=True, exist_ok=True)
    lock = open(dest / LOCK_FILE, "wb")  # noqa: SIM115  (held open for the whole job)
    try:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(
                f"{dest} is in use by another aegan encode (it holds the lock on "
                f"{dest / LOCK_FILE}); wait for that run to finish, or write to another --out"
            ) from None
        if job_file.is_file():
            _check_same_job(dest, job_file, record)
            for stale in dest.glob(f"{TEMP_PREFIX}*"):  # left by a run stopped mid-write
                stale.unlink(missing_ok=True)
        elif _foreign_files(dest):
            raise JobError(f"{dest} is not empty and holds no {JOB_FILE}; use a new or empty --out")
        else:
            write_atomic(job_file, (json.dumps(record, indent=2) + "\n").encode())
    except BaseException:
        lock.close()
        raise
    return lock


def _foreign_files(dest: Path) -> bool:
    return dest.is_dir() and any(p.name != LOCK_FILE for p in dest.iterdir())


def _check_same_job(dest: Path, job_file: Path, record: dict[str, Any]) -> None:
    try:
        earlier = json.loads(job_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JobError(f"{job_file} is not readable ({exc}); use another --out") from None
    if earlier.get("format_version") != JOB_VERSION:
        raise JobError(
            f"{job_file} was written by another version of aegan encode (format "
            f"{earlier.get('format_version')}; this one writes {JOB_VERSION}), so its parts "
            f"cannot be checked against the inputs. To start over, delete {dest} or write to "
            "another --out"
        )
    changed = [
        f"{_DIFFERENCES[key]}: {_shown(earlier.get(key))} there, {_shown(record[key])} now"
        for key in _DIFFERENCES
        if earlier.get(key) != record[key]
    ]
    if changed:
        raise JobError(
            f"{dest} holds the output of another job ({'; '.join(changed)}). Run the same "
            "job again to complete it, or write to another --out"
        )
    if earlier.get("contents_sha256") != record["contents_sha256"]:
        if record.get("array") is not None:
            what = ", ".join(
                f"{key} {earlier.get('array', {}).get(key)} there, {value} now"
                for key, value in record["array"].items()
                if earlier.get("array", {}).get(key) != value
            )
            detail = f"the .npy array changed since its parts were written ({what})"
        else:
            parts = [
                i
                for i, (old, new) in enumerate(
                    zip(earlier.get("parts_sha256") or [], record["parts_sha256"], strict=False)
                )
                if old != new
            ]
            where = f" of {PART_NAME.format(parts[0])}" if parts else ""
            more = f" and of {len(parts) - 1} more parts" if len(parts) > 1 else ""
            detail = (
                "files changed since its parts were written (the same names, but the size or "
                f"modification time of an input{where} differs{more})"
            )
        raise JobError(
            f"{dest}: {detail}; its parts would mix old and new results. To start over, "
            f"delete {dest} or write to another --out"
        )


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={str(v)[:12]}" for k, v in value.items())
    return str(value)[:12] if isinstance(value, str) and len(value) == 64 else str(value)


def part_schema(latent_dim: int, id_is_int: bool) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.int64() if id_is_int else pa.string(), nullable=False),
            pa.field("latent", pa.list_(pa.float32(), latent_dim)),
            pa.field("error", pa.string()),
        ]
    )


def write_part(
    plan: JobPlan, index: int, latents: np.ndarray, errors: Sequence[str | None]
) -> Path:
    """Write chunk ``index`` as ``part-NNNNN.parquet``, whole or not at all (a hidden temporary
    file, renamed into place: :func:`aegan_core.files.replace_file`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = plan.chunk(index)
    if len(errors) != len(rows) or len(latents) != len(rows):
        raise ValueError(f"part {index}: {len(errors)} results for {len(rows)} inputs")
    failed = np.array([e is not None for e in errors], bool)
    dim = plan.bundle.latent_dim
    validity = pa.py_buffer(np.packbits(~failed, bitorder="little").tobytes())
    values = pa.array(np.ascontiguousarray(latents, np.float32).reshape(-1))
    id_is_int = plan.inputs.kind == "npy"
    schema = part_schema(dim, id_is_int)
    latent = pa.Array.from_buffers(
        schema.field("latent").type,
        len(rows),
        [validity],
        null_count=int(failed.sum()),
        children=[values],
    )
    ids = (
        pa.array(np.arange(rows.start, rows.stop, dtype=np.int64))
        if id_is_int
        else pa.array([plan.inputs.id(i) for i in rows], pa.string())
    )
    table = pa.Table.from_arrays(
        [ids, latent, pa.array([None if e is None else printable(e) for e in errors], pa.string())],
        schema=schema,
    )
    path = plan.dest / PART_NAME.format(index)
    replace_file(path, lambda f: pq.write_table(table, f))
    return path


@dataclass(frozen=True)
class Batch:
    """Consecutive inputs of one chunk, read and encoded in one encoder run."""

    index: int  # chunk
    offset: int  # in the chunk
    items: list[Item]


def chunk_batches(plan: JobPlan, index: int, batch_size: int) -> Iterator[Batch]:
    """Chunk ``index`` cut into batches of at most ``batch_size`` inputs, made as needed."""
    rows = plan.chunk(index)
    for start in range(rows.start, rows.stop, batch_size):
        stop = min(start + batch_size, rows.stop)
        yield Batch(index, start - rows.start, plan.items(range(start, stop)))


class ChunkResults:
    """Results of batches gathered per chunk; a chunk's part is written once it is complete, and
    each result is counted in ``summary``."""

    def __init__(self, plan: JobPlan, summary: JobSummary) -> None:
        self.plan, self.summary = plan, summary
        self.latents: dict[int, np.ndarray] = {}
        self.errors: dict[int, list[str | None]] = {}
        self.remaining: dict[int, int] = {}

    def add(self, batch: Batch, latents: np.ndarray, errors: Sequence[str | None]) -> None:
        index, offset = batch.index, batch.offset
        if index not in self.latents:
            size = len(self.plan.chunk(index))
            self.latents[index] = np.zeros((size, self.plan.bundle.latent_dim), np.float32)
            self.errors[index] = [None] * size
            self.remaining[index] = size
        self.latents[index][offset : offset + len(errors)] = latents
        self.errors[index][offset : offset + len(errors)] = errors
        self.remaining[index] -= len(errors)
        self._count(self.plan.chunk(index).start + offset, errors)
        if self.remaining[index] == 0:
            write_part(self.plan, index, self.latents.pop(index), self.errors.pop(index))
            del self.remaining[index]

    def _count(self, first: int, errors: Sequence[str | None]) -> None:
        summary = self.summary
        for k, message in enumerate(errors):
            if message is None:
                summary.encoded += 1
                continue
            summary.errors += 1
            if len(summary.error_examples) < SHOWN_ERRORS:
                summary.error_examples.append((str(self.plan.inputs.id(first + k)), message))
