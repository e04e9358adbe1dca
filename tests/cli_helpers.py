"""Run the ``aegan`` command in a fresh interpreter, as a user does, or where some packages cannot
be imported: what an install without an optional extra sees."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.partition(".")[0] in {missing!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, NotInstalled())
    from aegan_cli import run
    sys.argv = ["aegan", *{args!r}]
    run()
    """
)


def run_aegan(
    args: list[str],
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``aegan ARGS`` in a fresh interpreter (this checkout first on the path), output captured."""
    return _run_python(["-m", "aegan_cli", *args], cwd, env, timeout)


def run_aegan_without(
    missing: tuple[str, ...], args: list[str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """``aegan ARGS`` with the top-level packages ``missing`` not importable."""
    code = _BLOCKER.format(missing=tuple(missing), args=list(args))
    return _run_python(["-c", code], cwd, None, 120)


def _run_python(
    argv: list[str], cwd: Path, env: dict[str, str] | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
