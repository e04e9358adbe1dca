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
  inputs, columns ``id`` (path relative to SOURCE, as listed, or the row index of an ``.npy``),
  ``latent`` (``fixed_size_list<float32>[latent_dim]``, null where the input failed) and ``error``
  (null, or why the input could not be encoded). Each part is written under a hidden temporary
  name and renamed into place, so a part that exists is complete.
- ``_job.json``: the source, the model (name and SHA-256 of its encoder), the chunk size and the
  inputs. A second run on the same DEST skips the parts that exist; one with another source,
  model or chunk size is refused instead of mixing two jobs in one table.

Readers of the table ignore files whose names start with ``_`` or ``.``.
"""

from __future__ import annotations

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .bundle import ENCODER, Bundle, load_bundle, resolve_bundle_dir
from .config import Limits, available_cpus, gpu_visible
from .errors import ClientError, RequestError
from .files import TEMP_PREFIX, replace_file, write_atomic
from .images import decode_upload, to_model_input
from .runtime import ModelRuntime

JOB_FILE = "_job.json"
JOB_VERSION = 1
PART_NAME = "part-{:05d}.parquet"
# Files a folder source contributes: the formats the service accepts (aegan_serve.images).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
# Settings of a job's output: a second run on the same DEST must match them all.
JOB_KEYS = ("source", "source_kind", "inputs", "ids_sha256", "chunk_size", "model")
SHOWN_ERRORS = 10  # errors kept in the summary (all of them are in the error column)

Pool = Literal["processes", "threads"]
Item = tuple[str, str]  # (label for messages, location: a file path or an .npy row index)


class JobError(ValueError):
    """The source, the model or DEST cannot be used as asked; the message says why."""


# --- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What a SOURCE holds, in the job's order (sorted)."""

    kind: Literal["folder", "list", "npy"]
    source: Path  # resolved
    ids: list[str] | list[int]  # the id column: relative path, path as listed, or row index
    locations: list[str]  # where each input is read from: an absolute path, or the row index

    def __len__(self) -> int:
        return len(self.ids)

    def ids_sha256(self) -> str:
        return hashlib.sha256("\n".join(map(str, self.ids)).encode()).hexdigest()


def list_inputs(source: str | os.PathLike[str], bundle: Bundle) -> Inputs:
    """The inputs of SOURCE: a folder of images (recursive, the service's formats), a text file
    listing one path per line (relative to the file's folder; blank lines and ``#`` comments are
    skipped), or an ``.npy`` array (N x D vectors, or N x C x H x W images)."""
    path = Path(source).resolve()
    if path.is_dir():
        _require_images(bundle, path)
        files = sorted(
            (p.relative_to(path).as_posix(), p)
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
        )
        return Inputs("folder", path, [i for i, _ in files], [str(p) for _, p in files])
    if not path.is_file():
        raise JobError(f"{source}: no such file or folder")
    if path.suffix.lower() == ".npy":
        rows = len(_open_array(path, bundle))
        return Inputs("npy", path, list(range(rows)), [str(i) for i in range(rows)])
    _require_images(bundle, path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"{source}: not a readable list of paths ({exc})") from None
    listed = sorted(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))
    return Inputs("list", path, listed, [str(path.parent / p) for p in listed])


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
    An input that cannot be read gets its error message (and a latent of zeros) instead of
    stopping the job."""
    latents = np.zeros((len(items), model.bundle.latent_dim), np.float32)
    errors: list[str | None] = [None] * len(items)
    good, arrays = [], []
    for k, (label, location) in enumerate(items):
        try:
            arrays.append(reader.read(label, location))
            good.append(k)
        except ClientError as exc:  # the service's answer to this upload would be this 4xx
            errors[k] = exc.message
        except OSError as exc:  # unreadable file: permissions, vanished, a folder, I/O error
            errors[k] = f"{label} could not be read: {exc.strerror or exc}"
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
    """A job checked against DEST: what to read, with which model, and which parts are missing."""

    inputs: Inputs
    bundle: Bundle
    dest: Path
    chunk_size: int
    missing: list[int]  # chunk indices whose part is not written yet
    record: dict[str, Any]

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


@dataclass
class JobSummary:
    inputs: int  # in SOURCE
    parts: int  # in DEST when the job is complete
    skipped: int  # inputs of parts written by an earlier run
    encoded: int  # by this run
    errors: int  # inputs of this run that could not be encoded
    seconds: float  # this run, start-up of the workers included
    error_examples: list[tuple[str, str]] = field(default_factory=list)  # (id, message), a few

    @property
    def images_per_s(self) -> float:
        return (self.encoded + self.errors) / self.seconds if self.seconds > 0 else 0.0


def plan_job(
    source: str | os.PathLike[str], model: str | os.PathLike[str], dest: Path, chunk_size: int
) -> JobPlan:
    """List SOURCE, load the model and check DEST: a new job records itself in ``_job.json``; an
    earlier run of the same job keeps its parts; another job's DEST is refused."""
    import pyarrow  # noqa: F401  (fail before any work when the 'batch' extra is missing)

    if chunk_size < 1:
        raise JobError(f"chunk size must be at least 1, got {chunk_size}")
    bundle = load_bundle(resolve_bundle_dir(model))  # verifies the SHA-256 of every graph
    inputs = list_inputs(source, bundle)
    if not len(inputs):
        kinds = ", ".join(IMAGE_SUFFIXES)
        raise JobError(f"{source}: no inputs found (a folder is searched for {kinds})")
    record = {
        "format_version": JOB_VERSION,
        "source": str(inputs.source),
        "source_kind": inputs.kind,
        "inputs": len(inputs),
        "ids_sha256": inputs.ids_sha256(),
        "chunk_size": chunk_size,
        "model": {
            "name": bundle.name,
            "encoder_sha256": bundle.manifest["files"][ENCODER]["sha256"],
        },
        "latent_dim": bundle.latent_dim,
        "bundle_path": str(bundle.path),
    }
    _claim_dest(dest, record)
    parts = -(-len(inputs) // chunk_size)
    missing = [i for i in range(parts) if not (dest / PART_NAME.format(i)).is_file()]
    return JobPlan(inputs, bundle, dest, chunk_size, missing, record)


_DIFFERENCES = {
    "source": "source",
    "source_kind": "kind of source",
    "inputs": "number of inputs",
    "ids_sha256": "list of inputs",
    "chunk_size": "chunk size (--chunk-size)",
    "model": "model (--model)",
}


def _claim_dest(dest: Path, record: dict[str, Any]) -> None:
    if dest.exists() and not dest.is_dir():
        raise JobError(f"{dest} is a file; --out names a directory of Parquet parts")
    job_file = dest / JOB_FILE
    if job_file.is_file():
        try:
            earlier = json.loads(job_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise JobError(f"{job_file} is not readable ({exc}); use another --out") from None
        changed = [
            f"{_DIFFERENCES[key]}: {_shown(earlier.get(key))} there, {_shown(record[key])} now"
            for key in JOB_KEYS
            if earlier.get(key) != record[key]
        ]
        if changed:
            raise JobError(
                f"{dest} holds the output of another job ({'; '.join(changed)}). Run the same "
                "job again to complete it, or write to another --out"
            )
        for stale in dest.glob(f"{TEMP_PREFIX}*"):  # left by a run that was stopped mid-write
            stale.unlink(missing_ok=True)
        return
    if dest.is_dir() and any(dest.iterdir()):
        raise JobError(f"{dest} is not empty and holds no {JOB_FILE}; use a new or empty --out")
    dest.mkdir(parents=True, exist_ok=True)
    write_atomic(job_file, (json.dumps(record, indent=2) + "\n").encode())


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
    ids = plan.inputs.ids[rows.start : rows.stop]
    failed = np.array([e is not None for e in errors], bool)
    dim = plan.bundle.latent_dim
    validity = pa.py_buffer(np.packbits(~failed, bitorder="little").tobytes())
    values = pa.array(np.ascontiguousarray(latents, np.float32).reshape(-1))
    schema = part_schema(dim, plan.inputs.kind == "npy")
    latent = pa.Array.from_buffers(
        schema.field("latent").type,
        len(ids),
        [validity],
        null_count=int(failed.sum()),
        children=[values],
    )
    table = pa.Table.from_arrays(
        [pa.array(ids, schema.field("id").type), latent, pa.array(list(errors), pa.string())],
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
        for k, message in enumerate(errors):
            if message is not None:
                self.summary.errors += 1
                if len(self.summary.error_examples) < SHOWN_ERRORS:
                    first = self.plan.chunk(index).start + offset + k
                    self.summary.error_examples.append((str(self.plan.inputs.ids[first]), message))
            else:
                self.summary.encoded += 1
        if self.remaining[index] == 0:
            write_part(self.plan, index, self.latents.pop(index), self.errors.pop(index))
            del self.remaining[index]


def _batches(plan: JobPlan, batch_size: int) -> Iterator[tuple[int, int, list[Item]]]:
    """(chunk index, offset in the chunk, items) for every batch of the missing chunks."""
    inputs = plan.inputs
    for index in plan.missing:
        rows = plan.chunk(index)
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            items = [(str(inputs.ids[i]), inputs.locations[i]) for i in range(start, stop)]
            yield index, start - rows.start, items


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
) -> JobSummary:
    """Encode the missing chunks on this machine and write their parts.

    ``pool="threads"``: ``workers`` threads read and convert images (Pillow's codecs release the
    GIL) and share one ONNX Runtime session with an intra-op thread per CPU.
    ``pool="processes"``: ``workers`` spawned processes, each with its own session and CPUs /
    workers intra-op threads, so the Python parts of decoding run in parallel too, at the cost
    of starting and importing in every process and of passing results between them.
    Threads are the default (``aegan encode --pool``): on the project's 2-core machine two threads
    encoded 5 000 Fashion-MNIST PNGs at 1871 images/s, two processes at 1292 (medians of three;
    docs/BENCHMARKS.md, ``.venv/bin/python bench/encode_collection.py``).
    ``progress`` is called with the number of inputs finished after every batch.
    """
    limits = limits or Limits()
    summary = _start_summary(plan)
    started = time.perf_counter()
    if plan.missing:
        chunks = _Chunks(plan, summary)
        reader = plan.reader(limits)
        executor: Executor
        if workers == 1 or pool == "threads":
            model = ModelRuntime(plan.bundle, device, available_cpus())
            executor = ThreadPoolExecutor(workers, thread_name_prefix="aegan-encode")

            def task(items: Sequence[Item]) -> tuple[np.ndarray, list[str | None]]:
                return encode_items(model, reader, items)

        else:
            executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(
                    str(plan.bundle.path),
                    device,
                    max(1, available_cpus() // workers),
                    reader,
                ),
            )
            task = _encode_in_worker
        with executor:
            pending: dict[Future, tuple[int, int]] = {}
            for index, offset, items in _batches(plan, batch_size):
                if len(pending) >= 4 * workers:  # a bounded queue: memory stays flat
                    _collect(pending, chunks, progress, FIRST_COMPLETED)
                pending[executor.submit(task, items)] = (index, offset)
            while pending:
                _collect(pending, chunks, progress, FIRST_COMPLETED)
    summary.seconds = time.perf_counter() - started
    return summary


def _collect(
    pending: dict[Future, tuple[int, int]],
    chunks: _Chunks,
    progress: Callable[[int], None],
    return_when: str,
) -> None:
    done, _ = wait(pending, return_when=return_when)
    for future in done:
        index, offset = pending.pop(future)
        latents, errors = future.result()
        chunks.add(index, offset, latents, errors)
        progress(len(errors))


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


class RayEncoder:
    """The callable class of the Ray Data actor pool: one model per actor, loaded once."""

    def __init__(self, bundle_dir: str, device: str, reader: Reader) -> None:
        self.model = ModelRuntime(load_bundle(bundle_dir), device, threads=1)
        self.reader = reader

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = list(zip(batch["label"].tolist(), batch["location"].tolist(), strict=True))
        latents, errors = encode_items(self.model, self.reader, items)
        return {
            "chunk": batch["chunk"],
            "offset": batch["offset"],
            "latent": latents,
            "error": np.array([e or "" for e in errors], dtype=object),
        }


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
    """The same job on Ray Data: the inputs of the missing chunks -> ``map_batches`` on an actor
    pool of :class:`RayEncoder` (one ONNX Runtime session per actor, one CPU each) -> each chunk's
    part written by this process as soon as all its rows have come back.

    ``address=None`` starts a Ray instance on this machine for the job, limited to its available
    CPUs; an address (``ray://HOST:10001``, ``HOST:6379``, or ``auto`` for the instance ``ray
    start`` runs here) joins a cluster, whose nodes must have aegan-serve installed and read SOURCE
    at the same path. ``workers`` (default: the cluster's CPUs) is the number of actors. A Ray
    already initialised in this process is used as it is.
    """
    import logging

    import ray
    import ray.data

    limits = limits or Limits()
    summary = _start_summary(plan)
    started = time.perf_counter()
    if not plan.missing:
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
        inputs = plan.inputs
        rows = [
            {
                "chunk": index,
                "offset": i - plan.chunk(index).start,
                "label": str(inputs.ids[i]),
                "location": inputs.locations[i],
            }
            for index in plan.missing
            for i in plan.chunk(index)
        ]
        dataset = ray.data.from_items(
            rows, override_num_blocks=max(1, min(len(rows) // batch_size, 8 * actors))
        ).map_batches(
            RayEncoder,
            fn_constructor_kwargs={
                "bundle_dir": str(plan.bundle.path),
                "device": device,
                "reader": plan.reader(limits),
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
        )
        chunks = _Chunks(plan, summary)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for index in np.unique(batch["chunk"]).tolist():
                rows_of = np.flatnonzero(batch["chunk"] == index)
                order = rows_of[np.argsort(batch["offset"][rows_of])]
                offsets = batch["offset"][order]
                # Rows of one chunk in one batch need not be contiguous: add them run by run.
                breaks = np.flatnonzero(np.diff(offsets) != 1) + 1
                for run in np.split(order, breaks):
                    errors = [e or None for e in batch["error"][run].tolist()]
                    chunks.add(index, int(batch["offset"][run[0]]), batch["latent"][run], errors)
            progress(len(batch["chunk"]))
    finally:
        if ours:
            ray.shutdown()
    summary.seconds = time.perf_counter() - started
    return summary


def job_record(dest: Path) -> dict[str, Any]:
    """The ``_job.json`` of a DEST."""
    return json.loads((dest / JOB_FILE).read_text(encoding="utf-8"))


def summary_dict(summary: JobSummary) -> dict[str, Any]:
    return {**asdict(summary), "images_per_s": summary.images_per_s}
