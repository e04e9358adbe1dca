"""Ray's actor pool for ``aegan encode --ray`` (aegan_batch/on_ray.py), without a GPU: the
resources each actor asks for and the device it runs on, decided from the cluster's resources; the
paths every node must see; an actor's error reaching the driver as the user's message."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from aegan_batch import JobError, plan_job
from aegan_batch.on_ray import (
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    RayLayout,
    _job_error,
    check_visible,
    ray_layout,
    run_job_on_ray,
)

ONE_CPU_NODE = {"CPU": 8.0, "memory": 1.0}
GPU_NODE = {"CPU": 16.0, "GPU": 2.0}


@pytest.mark.parametrize(
    ("nodes", "device", "workers", "batch", "expected"),
    [
        # CPUs only: one actor per CPU, on the CPU, whatever --device auto says
        ([ONE_CPU_NODE], "auto", None, None, RayLayout(8, 1, 0, "cpu", CPU_BATCH_SIZE)),
        ([ONE_CPU_NODE, ONE_CPU_NODE], "cpu", None, 64, RayLayout(16, 1, 0, "cpu", 64)),
        # GPUs: one actor per GPU with its node's CPUs per GPU, GPU-sized batches
        ([GPU_NODE], "auto", None, None, RayLayout(2, 8, 1, "auto", GPU_BATCH_SIZE)),
        ([{"CPU": 16.0, "GPU": 4.0}], "cuda", None, 512, RayLayout(4, 4, 1, "cuda", 512)),
        # a CPU-only head beside GPU nodes: the share is a GPU node's, not the cluster's
        (
            [ONE_CPU_NODE, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}],
            "auto",
            None,
            None,
            RayLayout(2, 4, 1, "auto", GPU_BATCH_SIZE),
        ),
        # --device cpu keeps a GPU cluster's actors off the GPUs
        ([GPU_NODE], "cpu", None, None, RayLayout(16, 1, 0, "cpu", CPU_BATCH_SIZE)),
        # --workers: fewer GPU actors, never more than the GPUs (they could not be placed)
        ([GPU_NODE], "auto", 1, None, RayLayout(1, 8, 1, "auto", GPU_BATCH_SIZE)),
        ([GPU_NODE], "auto", 5, None, RayLayout(2, 8, 1, "auto", GPU_BATCH_SIZE)),
        ([{"CPU": 4.0}], "cpu", 3, 64, RayLayout(3, 1, 0, "cpu", 64)),
    ],
)
def test_the_pool_follows_the_clusters_resources(nodes, device, workers, batch, expected):
    assert ray_layout(nodes, device, workers, batch) == expected


def test_cuda_on_a_cluster_without_gpus_is_refused():
    with pytest.raises(JobError, match="--device cuda, but the Ray cluster has no GPU"):
        ray_layout([ONE_CPU_NODE, ONE_CPU_NODE], "cuda", None, None)


def small_job(image_bundle: Path, tmp_path: Path):
    from PIL import Image

    source = tmp_path / "images"
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(pixels).save(source / f"{i}.png")
    return plan_job(source, image_bundle, tmp_path / "dest", chunk_size=3)


@pytest.mark.parametrize("missing", ["SOURCE", "the bundle", "DEST"])
def test_a_path_a_node_does_not_see_is_named(image_bundle, tmp_path, missing):
    bundle = tmp_path / "bundle"
    shutil.copytree(image_bundle, bundle)
    plan = small_job(bundle, tmp_path)
    try:
        check_visible(plan)  # all three are here
        gone = {"SOURCE": plan.inputs.source, "the bundle": bundle, "DEST": plan.dest}[missing]
        shutil.rmtree(gone)
        with pytest.raises(JobError, match=f"{missing} .* is not on node .*same paths"):
            check_visible(plan)
    finally:
        plan.release()


def test_an_actors_error_is_found_inside_rays_wrappers():
    original = JobError("DEST /x is not on node 'n2'")

    class Wrapped(JobError):  # as Ray wraps a task's error: a subclass, a traceback as its text
        cause = original

        def __str__(self) -> str:
            return "Traceback (most recent call last): ..."

    outer = RuntimeError("the actor died")
    outer.__cause__ = Wrapped()
    assert _job_error(outer) is original
    assert _job_error(RuntimeError("other")) is None
    died = RuntimeError(  # an actor that failed while starting: only the traceback's text
        "The actor died because of an error raised in its creation task\n  File ...\n"
        "aegan_batch.inputs.JobError: SOURCE /data is not on node 'n2': on a Ray cluster ..."
    )
    assert str(_job_error(died)) == "SOURCE /data is not on node 'n2': on a Ray cluster ..."


@pytest.mark.slow
def test_a_bundle_gone_from_the_node_stops_the_job_with_its_reason(image_bundle, tmp_path):
    """A real Ray instance: the actors check the paths before they encode anything, and the driver
    shows their JobError, not Ray's traceback."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the 'ray' extra is not installed (scripts/setup.sh installs it)")
    bundle = tmp_path / "bundle"
    shutil.copytree(image_bundle, bundle)
    plan = small_job(bundle, tmp_path)
    shutil.rmtree(bundle)  # after the driver loaded it: the actors' node does not see it
    try:
        with pytest.raises(JobError, match="the bundle .* is not on node") as caught:
            run_job_on_ray(plan, address=None, workers=1, batch_size=None, device="auto")
        assert "Traceback" not in str(caught.value)
    finally:
        plan.release()
    assert not list((tmp_path / "dest").glob("part-*.parquet"))
