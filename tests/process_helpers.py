"""Stopping a server started in a process group of its own (``bentoml serve``), for the tests and
the benchmarks (``bench/`` puts this folder on its path). Imports nothing of the project."""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import suppress


def stop_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop ``process`` and every process under it: SIGTERM to its process group, then SIGKILL to
    whatever is left after ``timeout`` seconds. Its workers each start a session of their own
    (circus does), so they are found as its children, not by the group."""
    import psutil

    try:
        workers = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    for worker in alive:
        with suppress(psutil.NoSuchProcess):
            worker.kill()
    psutil.wait_procs(alive, timeout=10)
