"""The job on Ray Data: an actor pool over the missing chunks, each actor encoding its chunk
through the same chunk -> batches -> part path as a local run and writing the part itself."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
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


class RayChunkEncoder:
    """The callable class of the Ray Data actor pool: one model per actor, loaded once. Each call
    gets one chunk index, reads and encodes that chunk's inputs and writes its part to DEST
    itself; only a summary of the chunk goes back to the driver."""

    def __init__(self, plan: list[Any], device: str, limits: UploadLimits, batch_size: int) -> None:
        import ray

        # [the plan's object ref]: inside a list, so that Ray passes the reference and the actor
        # fetches the plan itself (a node's object store holds one copy for all its actors)
        self.plan: JobPlan = ray.get(plan[0])
        bundle = load_bundle(self.plan.bundle.path)
        found = bundle.sha256(ENCODER)
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
            summary = JobSummary(0, 1, 0, 0, 0, 0.0)  # of this chunk alone
            results = ChunkResults(self.plan, summary)  # writes the part when it is complete
            for part in chunk_batches(self.plan, index, self.batch_size):
                results.add(part, *encode_items(self.model, self.reader, part.items))
            out["chunk"].append(index)
            out["rows"].append(summary.encoded + summary.errors)
            out["errors"].append(summary.errors)
            out["seconds"].append(time.perf_counter() - started)
            out["examples"].append(json.dumps(summary.error_examples))
        return {k: np.array(v, dtype=object if k == "examples" else None) for k, v in out.items()}


def run_job_on_ray(
    plan: JobPlan,
    *,
    address: str | None,
    workers: int | None,
    batch_size: int,
    device: str,
    limits: UploadLimits = UploadLimits(),
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
        resources = ray.cluster_resources()  # type: ignore[no-untyped-call]  # ray is untyped
        actors = workers or max(1, int(resources.get("CPU", 1)))
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
