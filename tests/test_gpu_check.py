"""bench/gpu_check.py on the CPU: it runs, writes its report, and says of each CUDA step that it was
skipped and why; rehearsed, the torch steps' code runs on the CPU (small networks, few steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from aegan_core.cuda import driver_reason  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TORCH_STEPS = ("operator_error", "torch_cold_start", "training", "resume")
ORT_STEPS = ("ort_provider", "ort_parity", "ort_cold_start", "serve")


def gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    return done, json.loads(out.read_text())


def test_on_the_cpu_every_cuda_step_is_skipped_with_its_reason(tmp_path):
    import torch

    if torch.cuda.is_available() or driver_reason() is None:
        pytest.skip("a GPU is here: the check would run its CUDA steps")
    done, report = gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = report["steps"]
    assert list(steps) == [
        "machine", "graph_interpreter", "operator_error", "ort_provider", "ort_parity",
        "ort_cold_start", "torch_cold_start", "training", "resume", "serve", "memory",
    ]  # fmt: skip
    for name in TORCH_STEPS:
        assert steps[name]["status"] == "skipped"
        assert steps[name]["reason"].startswith("torch sees no CUDA device"), steps[name]
    for name in ORT_STEPS:
        assert steps[name]["status"] == "skipped"
        assert steps[name]["reason"] == f"no usable ONNX Runtime CUDA provider: {driver_reason()}"
    machine = steps["machine"]["results"]
    assert machine["gpus"] == [] and machine["torch"] == torch.__version__
    # the torch re-run of the shipped graphs agrees with ONNX Runtime: what operator_error uses
    errors = steps["graph_interpreter"]["results"]
    assert set(errors) == {"generator", "encoder"}
    assert all(e["max_abs_error_float64_vs_ort_cpu"] < 1e-4 for e in errors.values())
    assert steps["memory"]["results"]["host_peak_rss_mib"] > 0
    assert report["total_s"] < 120 and not report["rehearsal_on_cpu"]


def test_a_step_that_does_not_fit_the_budget_is_skipped(tmp_path):
    done, report = gpu_check(tmp_path, "--budget-s", "0", "--only", "machine", "training")
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["steps"]["machine"]["status"] == "ok"
    assert report["steps"]["training"]["status"] == "skipped"
    assert report["steps"]["training"]["reason"].startswith("out of time")


def test_the_torch_steps_rehearsed_on_the_cpu(tmp_path):
    done, report = gpu_check(tmp_path, "--rehearsal", "--only", *TORCH_STEPS)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = report["steps"]
    assert report["rehearsal_on_cpu"] and all(steps[n]["status"] == "ok" for n in TORCH_STEPS)
    training = steps["training"]["results"]
    assert set(training) == {"aegan-fp32", "aegan-bf16", "gan-fp32", "gan-bf16"}
    assert all(r["finite_losses"] and r["steps_per_s"] > 0 for r in training.values())
    assert steps["resume"]["results"]["bit_exact_deterministic"] is True
    errors = steps["operator_error"]["results"]["generator"]["max_abs_error_vs_float64"]
    assert errors["fp32"] < 1e-4 < errors["fp16"] < errors["bf16"] < 0.5  # the formats' order
    cold = steps["torch_cold_start"]["results"]
    assert set(cold["generator-benchmark_off"]) == {"1", "2", "4", "8"}
