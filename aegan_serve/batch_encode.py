"""Batch encoding of collections (``aegan encode``): the service's own upload decoding and ONNX
encoder over a folder of images, a list of paths or an ``.npy`` array, written as Parquet parts.

Framework-free: numpy, Pillow through :mod:`aegan_serve.images` (``decode_upload`` and
``to_model_input``, the functions behind ``/encode``), ONNX Runtime through
:class:`~aegan_serve.runtime.ModelRuntime`. pyarrow (extra ``batch``) and ray (extra ``ray``) are
imported inside the functions that need them.

The output DEST is a directory (a name ending in ``.parquet`` is a directory too, as Spark and Ray
write them; ``pyarrow.parquet.read_table(DEST)`` and ``pandas.read_parquet(DEST)`` read it as one
table):

- ``part-00000.parquet``, ``part-00001.parquet``, ...: one per fixed-size chunk of the sorted
  inputs, columns ``id`` (path relative to SOURCE, as listed, or the row index of an ``.npy``;
  bytes of a file name that are not UTF-8 written as ``\\xNN``), ``latent``
  (``fixed_size_list<float32>[latent_dim]``, null where the input failed) and ``error`` (null, or
  why the input could not be encoded). Each part is written under a hidden temporary name and
  renamed into place; a restart also checks each part's row count and rewrites one that is short.
- ``_job.json``: the source, the model (name and SHA-256 of its encoder), the chunk size and the
  inputs: their names, and each one's size and modification time (for an ``.npy``: the file's
  size, modification time, shape and dtype). A second run on the same DEST skips the parts that
  exist; one with another source, model or chunk size, or on inputs that changed since, is
  refused instead of mixing two jobs, or old and new files, in one table.
- ``_job.lock``: locked by the run writing DEST; a second run on the same DEST is refused while
  the first one runs.

Readers of the table ignore files whose names start with ``_`` or ``.``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from .bundle import ENCODER, Bundle, load_bundle, resolve_bundle_dir
from .config import Limits, available_cpus, gpu_visible
from .errors import ClientError, RequestError
from .files import TEMP_PREFIX, replace_file, write_atomic
from .images import decode_upload, to_model_input
from .runtime import ModelRuntime

JOB_FILE = "_job.json"
JOB_VERSION = 2  # 2: the inputs' sizes and modification times are part of the job
LOCK_FILE = "_job.lock"  # locked (flock) by the run writing DEST
PART_NAME = "part-{:05d}.parquet"
# Files a folder source contributes: the formats the service accepts (aegan_serve.images).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
SHOWN_ERRORS = 10  # errors kept in the summary (all of them are in the error column)

Pool = Literal["processes", "threads"]
Item = tuple[str, str]  # (label for messages, location: a file path or an .npy row index)


class JobError(ValueError):
    """The source, the model or DEST cannot be used as asked; the message says why."""


# --- inputs -------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` as it is stored and shown: file names that are not valid UTF-8 (held by Python
    with surrogate escapes, as :func:`os.fsdecode` gives them) get their stray bytes written as
    ``\\xNN``, e.g. ``bad\\xff.png`` for the name made of the bytes ``bad``, 0xFF, ``.png``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decoding gives
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Inputs:
    """What a SOURCE holds, in the job's order (sorted).

    One list of names for a folder or a list of paths (locations are built from it when read),
    a ``range`` for an ``.npy``: memory grows with the number of inputs by one string each, and
    not at all for an array."""

    kind: Literal["folder", "list", "npy"]
    source: Path  # resolved
    names: Sequence[str] | range  # relative path (surrogate-escaped), path as listed, row index
    base: str  # the folder names are relative to ("" for an .npy)
    names_sha256: str  # the names (as bytes) in order: which inputs
    contents_sha256: str  # and each one's size and modification time (or the .npy's header)
    array: dict[str, Any] | None = None  # an .npy: its size, mtime_ns, shape and dtype
    parts_sha256: list[str] | None = None  # files: contents_sha256 of each chunk's inputs (16 hex)

    def __len__(self) -> int:
        return len(self.names)

    def id(self, i: int) -> str | int:
        """The ``id`` column of input ``i``: printable path, or the row index."""
        name = self.names[i]
        return name if isinstance(name, int) else printable(name)

    def location(self, i: int) -> str:
        """Where input ``i`` is read from: an absolute path, or the row index."""
        name = self.names[i]
        return str(name) if isinstance(name, int) else os.path.join(self.base, name)


def list_inputs(source: str | os.PathLike[str], bundle: Bundle, chunk_size: int = 1000) -> Inputs:
    """The inputs of SOURCE: a folder of images (recursive, the service's formats; links to
    folders are not followed), a text file listing one path per line (relative to the file's
    folder; blank lines and ``#`` comments are skipped), or an ``.npy`` array (N x D vectors, or
    N x C x H x W images). ``chunk_size`` groups the fingerprints of files by part."""
    path = Path(source).resolve()
    if path.is_dir():
        _require_images(bundle, path)
        names = []
        for top, _, files in os.walk(path):
            folder = os.path.relpath(top, path).replace(os.sep, "/")
            for name in files:
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                    names.append(name if folder == "." else f"{folder}/{name}")
        names.sort()
        return _file_inputs("folder", path, str(path), names, chunk_size)
    if not path.is_file():
        raise JobError(f"{source}: no such file or folder")
    if path.suffix.lower() == ".npy":
        array = _open_array(path, bundle)
        status = path.stat()
        header = {
            "size": status.st_size,
            "mtime_ns": status.st_mtime_ns,
            "shape": list(array.shape),
            "dtype": array.dtype.str,
        }
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
        names_digest = hashlib.sha256(f"rows {len(array)}".encode()).hexdigest()
        return Inputs("npy", path, range(len(array)), "", names_digest, digest, header)
    _require_images(bundle, path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise JobError(f"{source}: not a readable list of paths ({exc})") from None
    listed = (os.fsdecode(line.strip()) for line in lines)
    names = sorted(s for s in listed if s and not s.startswith("#"))
    return _file_inputs("list", path, str(path.parent), names, chunk_size)


def _file_inputs(
    kind: Literal["folder", "list"], source: Path, base: str, names: list[str], chunk_size: int
) -> Inputs:
    """Inputs of files, with the fingerprints of their names and of each one's size and
    modification time, for all of them and per chunk (a file that cannot be examined counts as
    missing, and will be an error row when read)."""
    which, contents, part = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    parts = []
    for k, name in enumerate(names):
        try:
            status = os.stat(os.path.join(base, name))
            facts = f"{status.st_size} {status.st_mtime_ns}"
        except OSError:
            facts = "missing"
        encoded = os.fsencode(name)
        which.update(encoded + b"\0")
        entry = encoded + b"\0" + facts.encode() + b"\n"
        contents.update(entry)
        part.update(entry)
        if (k + 1) % chunk_size == 0 or k + 1 == len(names):
            parts.append(part.hexdigest()[:16])
            part = hashlib.sha256()
    return Inputs(
        kind, source, names, base, which.hexdigest(), contents.hexdigest(), parts_sha256=parts
    )


def _require_images(bundle: Bundle, source: Path) -> None:
    if bundle.kind != "image":
        raise JobError(
            f"{source}: model {bundle.name!r} is a vector model (data shape "
            f"{list(bundle.data_shape)}); give it an .npy array of vectors"
        )


# .npy sources opened (memory-mapped) by this process, by path, modification time and size.
_ARRAYS: dict[tuple[str, int, int], np.ndarray] = {}


def _mapped(path: str) -> np.ndarray:
    status = os.stat(path)
    key = (path, status.st_mtime_ns, status.st_size)
    if key not in _ARRAYS:
        _ARRAYS[key] = np.load(path, mmap_mode="r", allow_pickle=False)
    return _ARRAYS[key]


def _open_array(path: Path, bundle: Bundle) -> np.ndarray:
    """The .npy array, memory-mapped; its rows must have the model's data shape."""
    try:
        array = _mapped(str(path))
    except (OSError, ValueError) as exc:
        raise JobError(f"{path}: not a readable .npy array ({exc})") from None
    if tuple(array.shape[1:]) != bundle.data_shape:
        raise JobError(
            f"{path}: array of shape {array.shape}; model {bundle.name!r} takes rows of "
            f"shape {bundle.data_shape} (N x {' x '.join(map(str, bundle.data_shape))})"
        )
    if not (np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array)):
        raise JobError(f"{path}: dtype {array.dtype} is not real numbers")
    return array


# --- reading and encoding (the same in every worker, process, thread or Ray actor) ---------------


@dataclass(frozen=True)
class FileReader:
    """Image files -> model input, exactly as ``/encode`` converts uploads, with its limits."""

    shape: tuple[int, int, int]
    max_bytes: int
    max_pixels: int

    def read(self, label: str, location: str) -> np.ndarray:
        image = decode_upload(
            Path(location),
            label=label,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            draft_size=max(self.shape[1:]),
        )
        return to_model_input(image, self.shape)


@dataclass(frozen=True)
class ArrayReader:
    """Rows of an .npy array -> model input, as training reads arrays: vectors as stored, images
    as uint8 0..255 or floats in [0, 1], mapped to [-1, 1]."""

    path: str  # checked by list_inputs: rows of the model's data shape, real numbers

    def read(self, label: str, location: str) -> np.ndarray:
        row = np.asarray(_mapped(self.path)[int(location)])
        if not np.all(np.isfinite(row)):
            raise RequestError(f"row {label} holds NaN or infinite values")
        if row.ndim == 1:  # a vector
            return row.astype(np.float32)
        if row.dtype == np.uint8:
            return row.astype(np.float32) / 127.5 - 1.0  # as to_model_input maps 8-bit pixels
        if row.min() < 0 or row.max() > 1:
            raise RequestError(f"row {label}: float images must lie in [0, 1]")
        return row.astype(np.float32) * 2 - 1


Reader = FileReader | ArrayReader


def encode_items(
    model: ModelRuntime, reader: Reader, items: Sequence[Item]
) -> tuple[np.ndarray, list[str | None]]:
    """Read and encode ``items`` in one encoder run: (latents (N, latent_dim), error per item).
    An input that cannot be read or converted gets its error message (and a latent of zeros)
    instead of stopping the job: the service's message for a bad upload, the reason a file could
    not be read, or ``LABEL: TypeName: message`` for any other exception."""
    latents = np.zeros((len(items), model.bundle.latent_dim), np.float32)
    errors: list[str | None] = [None] * len(items)
    good, arrays = [], []
    for k, (label, location) in enumerate(items):
        try:
            arrays.append(reader.read(label, location))
            good.append(k)
        except ClientError as exc:  # the service's answer to this upload would be this 4xx
            errors[k] = printable(exc.message)
        except OSError as exc:  # unreadable file: permissions, vanished, a folder, I/O error
            errors[k] = printable(f"{label} could not be read: {exc.strerror or exc}")
        except Exception as exc:  # conversion: MemoryError, a codec's or numpy's ValueError, ...
            errors[k] = printable(f"{label}: {type(exc).__name__}: {exc}")
    if arrays:
        latents[good] = model.encode(np.stack(arrays))
    return latents, errors


# One model per worker process, made by _start_worker when the process starts.
_WORKER: dict[str, Any] = {}


def _start_worker(bundle_dir: str, device: str, threads: int, reader: Reader) -> None:
    bundle = load_bundle(bundle_dir)
    _WORKER["model"] = ModelRuntime(bundle, device, threads, fp16=True)
    _WORKER["reader"] = reader


def _encode_in_worker(items: Sequence[Item]) -> tuple[np.ndarray, list[str | None]]:
    return encode_items(_WORKER["model"], _WORKER["reader"], items)


# --- the job ------------------------------------------------------------------------------------


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

    def reader(self, limits: Limits) -> Reader:
        if self.inputs.kind == "npy":
            return ArrayReader(str(self.inputs.source))
        shape = self.bundle.data_shape
        return FileReader(shape, limits.max_upload_bytes, limits.max_pixels)  # type: ignore[arg-type]

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

    @property
    def images_per_s(self) -> float:
        return (self.encoded + self.errors) / self.seconds if self.seconds > 0 else 0.0


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
            "encoder_sha256": bundle.manifest["files"][ENCODER]["sha256"],
        },
        "latent_dim": bundle.latent_dim,
        "bundle_path": str(bundle.path),
    }
    lock = _claim_dest(dest, record)
    try:
        plan = JobPlan(inputs, bundle, dest, chunk_size, [], record, started, lock)
        missing = [i for i in range(plan.parts) if not _part_is_whole(plan, i)]
    except BaseException:
        lock.close()
        raise
    return dataclasses.replace(plan, missing=missing)


def _part_is_whole(plan: JobPlan, index: int) -> bool:
    """Whether chunk ``index`` has its part, with one row per input of the chunk (a part that is
    not, or not a readable Parquet file, is written again)."""
    import pyarrow.parquet as pq

    path = plan.dest / PART_NAME.format(index)
    if not path.is_file():
        return False
    try:
        return pq.read_metadata(path).num_rows == len(plan.chunk(index))
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
    file, renamed into place: :func:`aegan_serve.files.replace_file`)."""
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


class _Chunks:
    """Results of batches gathered per chunk; a chunk's part is written once it is complete."""

    def __init__(self, plan: JobPlan, summary: JobSummary) -> None:
        self.plan, self.summary = plan, summary
        self.latents: dict[int, np.ndarray] = {}
        self.errors: dict[int, list[str | None]] = {}
        self.remaining: dict[int, int] = {}

    def add(
        self, index: int, offset: int, latents: np.ndarray, errors: Sequence[str | None]
    ) -> None:
        if index not in self.latents:
            size = len(self.plan.chunk(index))
            self.latents[index] = np.zeros((size, self.plan.bundle.latent_dim), np.float32)
            self.errors[index] = [None] * size
            self.remaining[index] = size
        self.latents[index][offset : offset + len(errors)] = latents
        self.errors[index][offset : offset + len(errors)] = errors
        self.remaining[index] -= len(errors)
        first = self.plan.chunk(index).start + offset
        _count(self.summary, self.plan, first, errors)
        if self.remaining[index] == 0:
            write_part(self.plan, index, self.latents.pop(index), self.errors.pop(index))
            del self.remaining[index]


def _count(summary: JobSummary, plan: JobPlan, first: int, errors: Sequence[str | None]) -> None:
    for k, message in enumerate(errors):
        if message is None:
            summary.encoded += 1
            continue
        summary.errors += 1
        if len(summary.error_examples) < SHOWN_ERRORS:
            summary.error_examples.append((str(plan.inputs.id(first + k)), message))


@dataclass(frozen=True)
class _Batch:
    index: int  # chunk
    offset: int  # in the chunk
    items: list[Item]


def _batches(plan: JobPlan, batch_size: int) -> Iterator[_Batch]:
    """Every batch of the missing chunks, made as it is needed."""
    for index in plan.missing:
        rows = plan.chunk(index)
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            yield _Batch(index, start - rows.start, plan.items(range(start, stop)))


def default_workers(device: str, pool: Pool) -> int:
    """One per CPU; one process when a GPU is visible and may be used (each process would hold a
    CUDA context of its own; threads share the one session)."""
    return 1 if pool == "processes" and device != "cpu" and gpu_visible() else available_cpus()


def run_job(
    plan: JobPlan,
    *,
    workers: int,
    batch_size: int,
    device: str,
    limits: Limits | None = None,
    pool: Pool,
    progress: Callable[[int], None] = lambda done: None,
    reader: Reader | None = None,
) -> JobSummary:
    """Encode the missing chunks on this machine and write their parts.

    ``pool="threads"``: ``workers`` threads read and convert images (Pillow's codecs release the
    GIL) and share one ONNX Runtime session with an intra-op thread per CPU.
    ``pool="processes"``: ``workers`` spawned processes, each with its own session and CPUs /
    workers intra-op threads, so the Python parts of decoding run in parallel too, at the cost
    of starting and importing in every process and of passing results between them. A worker
    process that dies (a crash in a codec, the kernel's out-of-memory killer) loses the batches
    in flight: they are run again in a fresh pool, one batch at a time, and a batch that kills
    its worker again item by item, so that only the input that kills it becomes an error row.
    Threads are the default (``aegan encode --pool``): see docs/BENCHMARKS.md
    (``.venv/bin/python bench/encode_collection.py``) for the two on the project's machine.
    ``progress`` is called with the number of inputs finished after every batch; ``reader``
    replaces the plan's way of reading inputs (it must pickle, for processes).
    """
    limits = limits or Limits()
    summary = _start_summary(plan)
    if plan.missing:
        chunks = _Chunks(plan, summary)
        reader = reader or plan.reader(limits)
        batches = _batches(plan, batch_size)
        if workers == 1 or pool == "threads":
            model = ModelRuntime(plan.bundle, device, available_cpus())

            def task(items: Sequence[Item]) -> tuple[np.ndarray, list[str | None]]:
                return encode_items(model, reader, items)

            with ThreadPoolExecutor(workers, thread_name_prefix="aegan-encode") as executor:
                _run_batches(executor, task, batches, chunks, progress, 4 * workers)
        else:

            def processes(count: int) -> ProcessPoolExecutor:
                return ProcessPoolExecutor(
                    count,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(
                        str(plan.bundle.path),
                        device,
                        max(1, available_cpus() // count),
                        reader,
                    ),
                )

            while True:  # until every batch is done; a pool whose worker died is replaced
                with processes(workers) as executor:
                    lost = _run_batches(
                        executor, _encode_in_worker, batches, chunks, progress, 4 * workers
                    )
                if not lost:
                    break
                _isolate(processes, lost, chunks, progress)
    summary.seconds = time.perf_counter() - plan.started
    return summary


def _run_batches(
    executor: Executor,
    task: Callable[[Sequence[Item]], tuple[np.ndarray, list[str | None]]],
    batches: Iterator[_Batch],
    chunks: _Chunks,
    progress: Callable[[int], None],
    window: int,
) -> list[_Batch]:
    """Run ``batches`` (at most ``window`` in flight: memory stays flat). Stops taking new ones
    when a worker process dies, and returns the batches it lost (the rest stay in ``batches``)."""
    pending: dict[Future, _Batch] = {}
    lost: list[_Batch] = []
    for batch in batches:
        try:
            pending[executor.submit(task, batch.items)] = batch
        except BrokenProcessPool:  # a worker died since the last results were taken
            lost.append(batch)
        while len(pending) >= window or (lost and pending):
            lost += _collect(pending, chunks, progress)
        if lost:
            break
    while pending:
        lost += _collect(pending, chunks, progress)
    return lost


def _collect(
    pending: dict[Future, _Batch], chunks: _Chunks, progress: Callable[[int], None]
) -> list[_Batch]:
    """Take the results of the batches that are done; those of a dead worker are returned."""
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    lost = []
    for future in done:
        batch = pending.pop(future)
        try:
            latents, errors = future.result()
        except BrokenProcessPool:
            lost.append(batch)
            continue
        chunks.add(batch.index, batch.offset, latents, errors)
        progress(len(errors))
    return lost


def _isolate(
    processes: Callable[[int], ProcessPoolExecutor],
    lost: list[_Batch],
    chunks: _Chunks,
    progress: Callable[[int], None],
) -> None:
    """Run the batches of a pool whose worker died again, one at a time in a fresh one-process
    pool; a batch that kills its worker again is run item by item, and an item that kills it is
    an error row."""
    executor = processes(1)
    try:
        for batch in sorted(lost, key=lambda b: (b.index, b.offset)):
            try:
                latents, errors = executor.submit(_encode_in_worker, batch.items).result()
            except BrokenProcessPool:
                executor.shutdown()
                executor = processes(1)
            else:
                chunks.add(batch.index, batch.offset, latents, errors)
                progress(len(errors))
                continue
            for k, item in enumerate(batch.items):
                try:
                    latents, errors = executor.submit(_encode_in_worker, [item]).result()
                except BrokenProcessPool:
                    executor.shutdown()
                    executor = processes(1)
                    latents = np.zeros((1, chunks.plan.bundle.latent_dim), np.float32)
                    errors = [
                        f"{item[0]}: BrokenProcessPool: the worker process died while reading "
                        "or encoding this input"
                    ]
                chunks.add(batch.index, batch.offset + k, latents, errors)
                progress(1)
    finally:
        executor.shutdown()


def _start_summary(plan: JobPlan) -> JobSummary:
    return JobSummary(
        inputs=len(plan.inputs),
        parts=plan.parts,
        skipped=len(plan.inputs) - plan.pending_inputs,
        encoded=0,
        errors=0,
        seconds=0.0,
    )


# --- Ray Data -----------------------------------------------------------------------------------


class RayChunkEncoder:
    """The callable class of the Ray Data actor pool: one model per actor, loaded once. Each call
    gets one chunk index, reads and encodes that chunk's inputs and writes its part to DEST
    itself; only a summary of the chunk goes back to the driver."""

    def __init__(self, plan: list[Any], device: str, limits: Limits, batch_size: int) -> None:
        import ray

        # [the plan's object ref]: inside a list, so that Ray passes the reference and the actor
        # fetches the plan itself (a node's object store holds one copy for all its actors)
        self.plan: JobPlan = ray.get(plan[0])
        bundle = load_bundle(self.plan.bundle.path)
        found = bundle.manifest["files"][ENCODER]["sha256"]
        if found != self.plan.record["model"]["encoder_sha256"]:
            raise JobError(
                f"{bundle.path} on this node holds another encoder ({found[:12]}) than the "
                "driver's: the bundle must be the same at the same path on every node"
            )
        self.model = ModelRuntime(bundle, device, threads=1)
        self.reader = self.plan.reader(limits)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {k: [] for k in ("chunk", "rows", "errors", "seconds")}
        out["examples"] = []
        for index in batch["chunk"].tolist():
            started = time.perf_counter()
            rows = self.plan.chunk(index)
            latents = np.zeros((len(rows), self.plan.bundle.latent_dim), np.float32)
            errors: list[str | None] = []
            for start in range(rows.start, rows.stop, self.batch_size):
                part = range(start, min(start + self.batch_size, rows.stop))
                z, e = encode_items(self.model, self.reader, self.plan.items(part))
                latents[start - rows.start : part.stop - rows.start] = z
                errors += e
            write_part(self.plan, index, latents, errors)
            failed = [(str(self.plan.inputs.id(rows.start + k)), e) for k, e in enumerate(errors)]
            failed = [f for f in failed if f[1] is not None]
            out["chunk"].append(index)
            out["rows"].append(len(rows))
            out["errors"].append(len(failed))
            out["seconds"].append(time.perf_counter() - started)
            out["examples"].append(json.dumps(failed[:SHOWN_ERRORS]))
        return {k: np.array(v, dtype=object if k == "examples" else None) for k, v in out.items()}


def run_job_on_ray(
    plan: JobPlan,
    *,
    address: str | None,
    workers: int | None,
    batch_size: int,
    device: str,
    limits: Limits | None = None,
    progress: Callable[[int], None] = lambda done: None,
) -> JobSummary:
    """The same job on Ray Data: one item per missing chunk (its index) -> ``map_batches`` on an
    actor pool of :class:`RayChunkEncoder` (``workers`` actors, one ONNX Runtime session and one
    CPU each), whose actors read their chunk's inputs, encode them in batches of ``batch_size``
    and write its part to DEST (a temporary file renamed into place) -> per-chunk summaries (rows,
    errors, seconds) back to this process, which shows progress from them.

    ``address=None`` starts a Ray instance on this machine for the job, limited to its available
    CPUs; an address (``ray://HOST:10001``, ``HOST:6379``, or ``auto`` for the instance ``ray
    start`` runs here) joins a cluster, whose nodes must have aegan-serve installed and see
    SOURCE, the bundle directory and DEST at the same paths (a shared file system). ``workers``
    (default: the cluster's CPUs) is the number of actors. A Ray already initialised in this
    process is used as it is.
    """
    import logging

    import ray
    import ray.data

    limits = limits or Limits()
    summary = _start_summary(plan)
    if not plan.missing:
        summary.seconds = time.perf_counter() - plan.started
        return summary
    ours = not ray.is_initialized()
    if ours:
        # Ray's own messages go to its session logs (/tmp/ray/session_latest/logs), not the
        # terminal.
        ray.init(
            address=address or "local",
            num_cpus=available_cpus() if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=True,
            logging_level=logging.ERROR,
        )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is the bar
        for handler in logging.getLogger("ray.data").handlers:
            if type(handler).__name__ != "SessionFileHandler":  # its file log stays complete
                handler.setLevel(logging.ERROR)
        actors = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        shipped = ray.put(dataclasses.replace(plan, lock=None))  # once per node, not per actor
        dataset = ray.data.from_items(
            [{"chunk": index} for index in plan.missing], override_num_blocks=len(plan.missing)
        ).map_batches(
            RayChunkEncoder,
            fn_constructor_kwargs={
                "plan": [shipped],
                "device": device,
                "limits": limits,
                "batch_size": batch_size,
            },
            batch_size=1,
            batch_format="numpy",
            concurrency=min(actors, len(plan.missing)),
            num_cpus=1,
        )
        examples: list[tuple[int, list[tuple[str, str]]]] = []
        for done in dataset.iter_rows():
            summary.errors += int(done["errors"])
            summary.encoded += int(done["rows"]) - int(done["errors"])
            examples.append((int(done["chunk"]), json.loads(done["examples"])))
            progress(int(done["rows"]))
    finally:
        if ours:
            ray.shutdown()
    unseen = [i for i in plan.missing if not _part_is_whole(plan, i)]
    if unseen:
        raise JobError(
            f"{len(unseen)} parts the Ray workers wrote are not whole in {plan.dest} here (first: "
            f"{PART_NAME.format(unseen[0])}): on a cluster DEST must be on a file system shared "
            "by every node, at the same path"
        )
    examples.sort()  # the first errors in the inputs' order, as a local run shows them
    summary.error_examples = [tuple(e) for _, chunk in examples for e in chunk][:SHOWN_ERRORS]  # type: ignore[misc]
    summary.seconds = time.perf_counter() - plan.started
    return summary


def job_record(dest: Path) -> dict[str, Any]:
    """The ``_job.json`` of a DEST."""
    return json.loads((dest / JOB_FILE).read_text(encoding="utf-8"))


def summary_dict(summary: JobSummary) -> dict[str, Any]:
    return {**asdict(summary), "images_per_s": summary.images_per_s}
