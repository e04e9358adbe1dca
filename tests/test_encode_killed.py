"""``aegan encode`` killed with SIGKILL in the middle of a job, then run again: every input is in
the table exactly once, and the parts written before the kill are not redone. Locally and on Ray."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import ROOT, run_aegan
from process_helpers import stop_group

from aegan_batch import JOB_FILE

pq = pytest.importorskip("pyarrow.parquet", reason="the 'batch' extra (pyarrow) is not installed")

ROWS = 24_000
CHUNK = 1000


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ROWS`` random 28x28 grey images as one .npy (the shipped model's input shape)."""
    path = tmp_path_factory.mktemp("killed") / "images.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, 256, (ROWS, 1, 28, 28), dtype=np.uint8))
    return path


def parts(dest: Path) -> dict[str, int]:
    """The whole parts in DEST and their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(dest.glob("part-*.parquet"))}


def kill_midway(args: list[str], dest: Path, at_least: int, timeout: float = 180) -> dict[str, int]:
    """Start ``aegan ARGS``, SIGKILL its whole process group once DEST holds ``at_least`` parts
    (and not all of them), and return the parts written by then."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "aegan_cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while len(parts(dest)) < at_least:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no part written in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop_group(proc)
    written = parts(dest)
    assert at_least <= len(written) < ROWS // CHUNK, "killed too late to test a restart"
    return written


def check_complete(dest: Path, before: dict[str, int]) -> None:
    table = pq.read_table(dest)
    ids = table.column("id").to_pylist()
    assert len(ids) == ROWS and sorted(ids) == list(range(ROWS))  # none missing, none twice
    assert table.column("error").null_count == ROWS
    after = parts(dest)
    assert len(after) == ROWS // CHUNK
    assert {name: after[name] for name in before} == before  # not redone


def test_a_killed_local_job_finishes_on_the_next_run(source, tmp_path):
    dest = tmp_path / "local"
    args = ["encode", str(source), "--out", str(dest), "--chunk-size", str(CHUNK)]
    before = kill_midway([*args, "--workers", "1"], dest, at_least=2)
    result = run_aegan(args, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(before)} of {ROWS // CHUNK} parts already written" in result.stdout
    check_complete(dest, before)
    assert (dest / JOB_FILE).is_file()


@pytest.mark.slow
def test_a_killed_ray_job_finishes_on_the_next_run(source, tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the 'ray' extra is not installed (scripts/setup.sh installs it)")
    dest = tmp_path / "ray"
    args = ["encode", str(source), "--out", str(dest), "--chunk-size", str(CHUNK), "--ray"]
    before = kill_midway([*args, "--workers", "1"], dest, at_least=2, timeout=300)
    result = run_aegan(args, timeout=600)
    assert result.returncode == 0, result.stderr
    check_complete(dest, before)
