"""The type checker passes on the packages pyproject's ``[tool.mypy]`` names: every product
package (the core and the batch jobs with the checks of ``mypy --strict``, the service, the CLI,
training and export with mypy's defaults), so a wrong type in them fails the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_passes():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", "/tmp/aegan-mypy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_sees_a_type_error(tmp_path):
    """The check can fail: a core-style module that returns a str as an int is reported."""
    module = tmp_path / "wrong.py"
    module.write_text("def f() -> int:\n    return 'not a number'\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--strict", str(module)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1 and "Incompatible return value type" in result.stdout
