"""The packages keep one dependency direction (docs/ARCHITECTURE.md):

    aegan_cli  ->  export  ->  training  ->  aegan_core  <-  aegan_batch
                                                   ^
                                                   +----  aegan_serve (the BentoML service)

Nothing but the CLI imports the service; the core imports neither torch nor a web framework (the
one exception: BentoML's model store, imported lazily by the lookup of a ``bentoml:`` model tag);
the service and the batch jobs never import torch. The layers load only what they need: training
never loads BentoML or ONNX Runtime, the ``aegan`` command loads no torch until a command needs it,
and an install without the ``train`` extra is told which extra a command needs.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_aegan, run_aegan_without

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aegan_core", "aegan_serve", "aegan_batch", "training", "export", "aegan_cli")
# Which project packages each package may import (at any depth: module level or inside functions).
ALLOWED = {
    "aegan_core": set(),
    "aegan_serve": {"aegan_core"},
    "aegan_batch": {"aegan_core"},
    "training": {"aegan_core"},
    "export": {"aegan_core", "training"},
    "aegan_cli": {"aegan_core", "aegan_batch", "aegan_serve", "training", "export"},
}
WEB_FRAMEWORKS = ("bentoml", "starlette", "python_multipart", "uvicorn", "fastapi")
NO_TORCH = ("aegan_core", "aegan_serve", "aegan_batch")  # the serving image carries no torch
# (file, module) imports allowed against the rules above, each with its reason.
EXCEPTIONS = {
    # BentoML's model store (not its server) resolves ``AEGAN_MODEL=bentoml:NAME``, inside the one
    # function that reads it.
    ("aegan_core/bundle.py", "bentoml"),
    ("aegan_core/bundle.py", "bentoml.exceptions"),
}


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, bool]]:
    """(absolute module name, imported at module level) for every import in a file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(package[: len(package) - node.level + 1])
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name in PACKAGES:  # "from aegan_serve import images": the module is the name
                found += [(f"{name}.{alias.name}", id(node) in top_level) for alias in node.names]
            else:
                found.append((name, id(node) in top_level))
    return found


def layering_violations(root: Path) -> list[str]:
    """Imports against the one direction, for the tree at ``root``."""
    files = []
    for package in PACKAGES:
        files += sorted((root / package).rglob("*.py"))
    wrong = []
    for path in files:
        rel = path.relative_to(root)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for name, _top in _imports(path, root):
            if (rel.as_posix(), name) in EXCEPTIONS:
                continue
            target = name.partition(".")[0]
            if target in PACKAGES and target != own and target not in ALLOWED[own]:
                wrong.append(f"{rel} imports {name}")
            elif own in NO_TORCH and target == "torch":
                wrong.append(f"{rel} imports torch")
            elif own == "aegan_core" and target in WEB_FRAMEWORKS:
                wrong.append(f"{rel} imports {name}, a web framework")
    return wrong


def test_packages_import_in_one_direction():
    wrong = layering_violations(ROOT)
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_wrong_imports(tmp_path):
    """The scan itself, on a small tree with one import of each wrong kind."""
    files = {
        "aegan_core/images.py": "import bentoml\nfrom aegan_serve.service import AEGAN\n",
        "aegan_core/latents.py": "def f():\n    import torch\n",
        "aegan_core/bundle.py": "def f():\n    import bentoml\n",  # the model store: allowed
        "aegan_serve/service.py": "from aegan_core import images\nimport torch.nn\n",
        "aegan_batch/job.py": "from aegan_serve import config\n",
        "training/data.py": "def f():\n    from aegan_serve.service import AEGAN\n",
        "training/losses.py": "from export.bundle_writer import export_bundle\n",
        "export/cli.py": "from aegan_core import bundle\nfrom aegan_batch import plan_job\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(layering_violations(tmp_path)) == sorted(
        [
            "aegan_core/images.py imports bentoml, a web framework",
            "aegan_core/images.py imports aegan_serve.service",
            "aegan_core/latents.py imports torch",
            "aegan_serve/service.py imports torch",
            "aegan_batch/job.py imports aegan_serve.config",
            "training/data.py imports aegan_serve.service",
            "training/losses.py imports export.bundle_writer",
            "export/cli.py imports aegan_batch.plan_job",
        ]
    )


def _loaded_after(code: str, env: dict[str, str] | None = None, whole: bool = False) -> set[str]:
    """Top-level modules (``whole``: all modules) loaded by a fresh interpreter after ``code``."""
    names = "sorted(sys.modules)" if whole else "sorted({m.partition('.')[0] for m in sys.modules})"
    script = f"{code}\nimport json, sys\nprint(json.dumps({names}))"
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_training_loads_neither_bentoml_nor_onnxruntime():
    loaded = _loaded_after("import training.training_loop, training.data, training.evaluate")
    assert "torch" in loaded  # the probe works: training does load torch
    assert not loaded & {"bentoml", "onnxruntime", "starlette", "pydantic", "aegan_serve"}


def test_aegan_help_loads_no_torch_and_no_service():
    modules = _loaded_after(
        "import sys\nfrom aegan_cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "for command in ('train', 'export', 'eval', 'directions', 'classifier', 'encode'):\n"
        "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n",
        whole=True,
    )
    loaded = {name.partition(".")[0] for name in modules}
    assert "click" in loaded
    assert not loaded & {"torch", "bentoml", "onnxruntime", "numpy", "onnx"}
    # the presets are all the help shows of the run configuration, whose dataclasses cost a tenth
    # of the start-up to build (bench/cli_startup.py)
    assert "training.presets" in modules
    assert "training.config" not in modules


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--preset", "tiny", "--steps", "1"],
        ["export", "runs/none", "--out", "bundle"],
        ["classifier", "--report"],
    ],
)
def test_commands_name_the_extra_they_need(args, tmp_path):
    # What an install without the train extra sees: torch, onnx and onnxscript are missing.
    result = run_aegan_without(("torch", "onnx", "onnxscript"), args, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "install the 'train' extra: pip install 'aegan-serve[train]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_set_is_checked_against_the_field_type(tmp_path):
    """--set train.steps=abc used to end in a raw TypeError; 1.5 and true were taken."""
    for value, expected in (("abc", "an integer"), ("1.5", "an integer"), ("true", "an integer")):
        args = ["train", "--preset", "tiny", "--dry-run", "--set", f"train.steps={value}"]
        result = run_aegan(args, timeout=60)
        assert result.returncode == 2, result.stdout
        assert f"--set: train.steps: expected {expected}" in result.stderr
        assert "Traceback" not in result.stderr


def test_serving_requirements_are_pyproject_pinned():
    """requirements-serve.txt (the container's and the Bento's list) is generated from pyproject's
    dependencies: same packages, same markers, each pin inside pyproject's range."""
    import tomllib

    from packaging.requirements import Requirement

    declared = {
        (r.name, str(r.marker)): r
        for r in map(
            Requirement,
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"],
        )
    }
    lines = (ROOT / "requirements-serve.txt").read_text().splitlines()
    pinned = {
        (r.name, str(r.marker)): r
        for r in (Requirement(line) for line in lines if line and not line.startswith("#"))
    }
    assert pinned.keys() == declared.keys()
    for key, req in pinned.items():
        for spec in req.specifier:
            if spec.operator == "==":
                assert declared[key].specifier.contains(spec.version), (req, declared[key])
