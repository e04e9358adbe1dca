"""The repository keeps its promises: the README's commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```(?:bash|sh)\n(.+?)\n```", text, flags=re.S | re.M)


def test_readme_opens_with_serve_and_test_commands():
    serve, test = readme_commands()[:2]
    assert "bentoml serve" in serve
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_serving_code_never_imports_torch():
    for path in (ROOT / "aegan_serve").rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+torch\b", source, re.M), path
