"""The job on Ray Data: an actor pool over the missing chunks, each actor encoding its chunk
through the same chunk -> batches -> part path as a local run and writing the part itself."""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aegan_core.bundle import ENCODER, load_bundle
from aegan_core.images import UploadLimits
from aegan_core.runtime import ModelRuntime, available_cpus

from .inputs import JobError, encode_items
from .job import (
    PART_NAME,
    SHOWN_ERRORS,
    ChunkResults,
    JobPlan,
    JobSummary,
    chunk_batches,
    part_is_whole,
)

JOB_ERROR_LINE = re.compile(r"^aegan_batch\.inputs\.JobError: (.+)$", re.MULTILINE)
GPU_BATCH_SIZE = 1024  # encoder rows per run on a GPU actor when --batch-size is not given
CPU_BATCH_SIZE = 256  # and on a CPU actor


@dataclass(frozen=True)
class RayLayout:
    """The actor pool a job asks Ray for: how many actors, what each one requests, and how each
    runs the encoder."""

    actors: int
    num_cpus: float  # per actor
    num_gpus: float  # per actor: 1 on a GPU actor (Ray makes that GPU its only visible one)
    device: str  # the ModelRuntime device inside each actor
    batch_size: int  # encoder rows per run


def ray_layout(
    nodes: Sequence[Mapping[str, float]],
    device: str,
    workers: int | None,
    batch_size: int | None,
) -> RayLayout:
    """The pool for a cluster whose live nodes hold ``nodes`` (each node's resources, from
    ``ray.nodes()``). With GPUs and ``--device`` auto or cuda: one actor per GPU (``num_gpus=1``:
    one CUDA session per GPU) with the CPUs per GPU of the GPU node that has the fewest (so every
    GPU's actor fits on its node), batches of :data:`GPU_BATCH_SIZE`; ``workers`` may ask for
    fewer actors, not more than the GPUs. Otherwise one actor per CPU, on the CPU, ``workers``
    of them if given. ``--device cuda`` on a cluster without a GPU is refused."""
    cpus = sum(int(node.get("CPU", 0)) for node in nodes)
    gpu_nodes = [node for node in nodes if int(node.get("GPU", 0)) > 0]
    gpus = sum(int(node["GPU"]) for node in gpu_nodes)
    if device == "cuda" and gpus == 0:
        raise JobError(f"--device cuda, but the Ray cluster has no GPU ({cpus} CPUs, no GPU)")
    if device != "cpu" and gpus > 0:
        share = min(int(node.get("CPU", 0)) // int(node["GPU"]) for node in gpu_nodes)
        return RayLayout(
            actors=min(workers, gpus) if workers else gpus,
            num_cpus=max(1, share),
            num_gpus=1,
            device="cuda" if device == "cuda" else "auto",
            batch_size=batch_size or GPU_BATCH_SIZE,
        )
    return RayLayout(
        actors=workers or max(1, cpus),
        num_cpus=1,
        num_gpus=0,
        device="cpu",
        batch_size=batch_size or CPU_BATCH_SIZE,
    )


def check_visible(plan: JobPlan) -> None:
    """A :class:`JobError` unless SOURCE, the bundle and DEST are where the driver saw them (on a
    cluster, every node must see them at the same paths: a shared file system)."""
    node = platform.node()
    for what, path in (
        ("SOURCE", plan.inputs.source),
        ("the bundle", plan.bundle.path),
        ("DEST", plan.dest),
    ):
        if not path.exists():
            raise JobError(
                f"{what} {path} is not on node {node!r}: on a Ray cluster SOURCE, the bundle and "
                "DEST must be on a file system every node sees, at the same paths"
            )


class RayChunkEncoder:
    """The callable class of the Ray Data actor pool: one model per actor, loaded once. Each call
    gets one chunk index, reads and encodes that chunk's inputs and writes its part to DEST
    itself; only a summary of the chunk goes back to the driver."""

    def __init__(
        self, plan: list[Any], device: str, limits: UploadLimits, batch_size: int, threads: int
    ) -> None:
        import ray

        # [the plan's object ref]: inside a list, so that Ray passes the reference and the actor
        # fetches the plan itself (a node's object store holds one copy for all its actors)
        self.plan: JobPlan = ray.get(plan[0])
        check_visible(self.plan)
        bundle = load_bundle(self.plan.bundle.path)
        found = bundle.sha256(ENCODER)
        if found != self.plan.record["model"]["encoder_sha256"]:
            raise JobError(
                f"{bundle.path} on this node holds another encoder ({found[:12]}) than the "
                "driver's: the bundle must be the same at the same path on every node"
            )
        self.model = ModelRuntime(bundle, device, threads=threads, max_rows=batch_size)
        self.reader = self.plan.reader(limits)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = ("chunk", "rows", "errors", "seconds", "provider")
        out: dict[str, list[Any]] = {k: [] for k in keys}
        out["examples"] = []
        for index in batch["chunk"].tolist():
            started = time.perf_counter()
            summary = JobSummary(0, 1, 0, 0, 0, 0.0)  # of this chunk alone
            results = ChunkResults(self.plan, summary)  # writes the part when it is complete
            for part in chunk_batches(self.plan, index, self.batch_size):
                results.add(part, *encode_items(self.model, self.reader, part.items))
            out["chunk"].append(index)
            out["rows"].append(summary.encoded + summary.errors)
            out["errors"].append(summary.errors)
            out["seconds"].append(time.perf_counter() - started)
            out["provider"].append(self.model.provider)
            out["examples"].append(json.dumps(summary.error_examples))
        text = ("examples", "provider")
        return {k: np.array(v, dtype=object if k in text else None) for k, v in out.items()}


def run_job_on_ray(
    plan: JobPlan,
    *,
    address: str | None,
    workers: int | None,
    batch_size: int | None,
    device: str,
    limits: UploadLimits = UploadLimits(),
    progress: Callable[[int], None] = lambda done: None,
) -> JobSummary:
    """The same job on Ray Data: one item per missing chunk (its index) -> ``map_batches`` on an
    actor pool of :class:`RayChunkEncoder` (:func:`ray_layout`: one actor per CPU, or one per GPU
    when the cluster has GPUs and ``device`` allows them; one ONNX Runtime session each), whose
    actors read their chunk's inputs, encode them in batches of ``batch_size`` and write its part
    to DEST (a temporary file renamed into place) -> per-chunk summaries (rows, errors, seconds,
    the execution provider) back to this process, which shows progress from them.

    ``address=None`` starts a Ray instance on this machine for the job, limited to its available
    CPUs; an address (``ray://HOST:10001``, ``HOST:6379``, or ``auto`` for the instance ``ray
    start`` runs here) joins a cluster, whose nodes must have aegan-serve installed and see
    SOURCE, the bundle directory and DEST at the same paths (a shared file system). ``workers``
    (default: the cluster's CPUs, or GPUs) is the number of actors. A Ray already initialised in
    this process is used as it is.
    """
    import logging

    import ray
    import ray.data

    summary = JobSummary.start(plan)
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
        live = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]  # untyped
        nodes = [node["Resources"] for node in live]
        layout = ray_layout(nodes, device, workers, batch_size)
        # Absolute paths: an actor's working directory is not this process's.
        bundle = dataclasses.replace(plan.bundle, path=plan.bundle.path.resolve())
        shipped = ray.put(  # once per node, not per actor
            dataclasses.replace(plan, lock=None, dest=plan.dest.resolve(), bundle=bundle)
        )
        dataset = ray.data.from_items(
            [{"chunk": index} for index in plan.missing], override_num_blocks=len(plan.missing)
        ).map_batches(
            RayChunkEncoder,
            fn_constructor_kwargs={
                "plan": [shipped],
                "device": layout.device,
                "limits": limits,
                "batch_size": layout.batch_size,
                "threads": max(1, int(layout.num_cpus)),
            },
            batch_size=1,
            batch_format="numpy",
            concurrency=min(layout.actors, len(plan.missing)),
            num_cpus=layout.num_cpus,
            num_gpus=layout.num_gpus,
        )
        examples: list[tuple[int, list[tuple[str, str]]]] = []
        for done in dataset.iter_rows():
            summary.errors += int(done["errors"])
            summary.encoded += int(done["rows"]) - int(done["errors"])
            examples.append((int(done["chunk"]), json.loads(done["examples"])))
            summary.providers.add(str(done["provider"]))
            progress(int(done["rows"]))
    except Exception as exc:
        found = _job_error(exc)  # an actor's JobError (a path this node does not see, ...)
        if found is None:
            raise
        raise found from None
    finally:
        if ours:
            ray.shutdown()
    unseen = [i for i in plan.missing if not part_is_whole(plan, i)]
    if unseen:
        raise JobError(
            f"{len(unseen)} parts the Ray workers wrote are not whole in {plan.dest} here (first: "
            f"{PART_NAME.format(unseen[0])}): on a cluster DEST must be on a file system shared "
            "by every node, at the same path"
        )
    examples.sort()  # the first errors in the inputs' order, as a local run shows them
    shown = [(str(id_), str(message)) for _, chunk in examples for id_, message in chunk]
    summary.error_examples = shown[:SHOWN_ERRORS]
    summary.seconds = time.perf_counter() - plan.started
    return summary


def _job_error(exc: BaseException) -> JobError | None:
    """The :class:`JobError` an actor raised, inside the errors Ray wraps it in, or None. Ray's
    wrapper of a task's error subclasses the error's class too, with a traceback as its text;
    the original is its ``cause``. An actor that fails while it starts is reported by an
    ``ActorDiedError`` that keeps only that traceback's text, whose last line is the error's."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, JobError):
            return cause
        if isinstance(current, JobError) and not isinstance(cause, BaseException):
            return current
        todo += [current.__cause__, cause]
    told = JOB_ERROR_LINE.findall(str(exc))  # ActorDiedError: the text is all that is left
    return JobError(told[-1]) if told else None
