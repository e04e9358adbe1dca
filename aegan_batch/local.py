"""The job on this machine: worker threads sharing one ONNX Runtime session, or worker processes
with a session each (a process that dies loses only its batches, which are run again)."""

from __future__ import annotations

import multiprocessing
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
from typing import Any, Literal

import numpy as np

from aegan_core.bundle import load_bundle
from aegan_core.images import UploadLimits
from aegan_core.runtime import ModelRuntime, available_cpus, gpu_visible

from .inputs import Item, Reader, encode_items
from .job import Batch, ChunkResults, JobPlan, JobSummary, chunk_batches

Pool = Literal["processes", "threads"]
Result = tuple[np.ndarray, list[str | None]]  # latents and an error (or None) per input
Encode = Callable[[Sequence[Item]], Result]
Pending = Future[Result]

# One model per worker process, made by _start_worker when the process starts.
_WORKER: dict[str, Any] = {}


def _start_worker(
    bundle_dir: str, device: str, threads: int, reader: Reader, batch_size: int
) -> None:
    bundle = load_bundle(bundle_dir)
    _WORKER["model"] = ModelRuntime(bundle, device, threads, fp16=True, max_rows=batch_size)
    _WORKER["reader"] = reader


def _encode_in_worker(items: Sequence[Item]) -> tuple[np.ndarray, list[str | None]]:
    return encode_items(_WORKER["model"], _WORKER["reader"], items)


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
    limits: UploadLimits = UploadLimits(),
    pool: Pool,
    progress: Callable[[int], None] = lambda done: None,
    reader: Reader | None = None,
) -> JobSummary:
    """Encode the missing chunks on this machine and write their parts.

    ``pool="threads"``: ``workers`` threads read and convert images (Pillow's codecs release the
    GIL) and share one ONNX Runtime session, each run of it with CPUs / workers intra-op threads
    (the workers run it at the same time).
    ``pool="processes"``: ``workers`` spawned processes, each with its own session and CPUs /
    workers intra-op threads, so the Python parts of decoding run in parallel too, at the cost
    of starting and importing in every process and of passing results between them. A worker
    process that dies (a crash in a codec, the kernel's out-of-memory killer) loses the batches
    in flight: they are run again in a fresh pool, one batch at a time, and a batch that kills
    its worker again item by item, so that only the input that kills it becomes an error row.
    Processes are ``aegan encode``'s default (``--pool``): see docs/BENCHMARKS.md
    (``.venv/bin/python bench/encode_collection.py``) for the two on the project's machine.
    ``progress`` is called with the number of inputs finished after every batch; ``reader``
    replaces the plan's way of reading inputs (it must pickle, for processes).
    """
    summary = JobSummary.start(plan)
    if plan.missing:
        chunks = ChunkResults(plan, summary)
        read: Reader = reader or plan.reader(limits)
        batches = (b for index in plan.missing for b in chunk_batches(plan, index, batch_size))
        if workers == 1 or pool == "threads":
            # The threads run the session at once: CPUs / workers intra-op threads per run, so
            # that together they use the CPUs without crowding them (as the processes do).
            intra = max(1, available_cpus() // workers)
            model = ModelRuntime(plan.bundle, device, intra, max_rows=batch_size)

            def task(items: Sequence[Item]) -> tuple[np.ndarray, list[str | None]]:
                return encode_items(model, read, items)

            with ThreadPoolExecutor(workers, thread_name_prefix="aegan-encode") as threads:
                _run_batches(threads, task, batches, chunks, progress, 4 * workers)
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
                        read,
                        batch_size,
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
    task: Encode,
    batches: Iterator[Batch],
    chunks: ChunkResults,
    progress: Callable[[int], None],
    window: int,
) -> list[Batch]:
    """Run ``batches`` (at most ``window`` in flight: memory stays flat). Stops taking new ones
    when a worker process dies, and returns the batches it lost (the rest stay in ``batches``)."""
    pending: dict[Pending, Batch] = {}
    lost: list[Batch] = []
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
    pending: dict[Pending, Batch],
    chunks: ChunkResults,
    progress: Callable[[int], None],
) -> list[Batch]:
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
        chunks.add(batch, latents, errors)
        progress(len(errors))
    return lost


def _isolate(
    processes: Callable[[int], ProcessPoolExecutor],
    lost: list[Batch],
    chunks: ChunkResults,
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
                chunks.add(batch, latents, errors)
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
                chunks.add(Batch(batch.index, batch.offset + k, [item]), latents, errors)
                progress(1)
    finally:
        executor.shutdown()
