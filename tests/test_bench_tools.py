"""The training benches run against the code as it is: a bench that imports a name the code no
longer has, or times a step the loop no longer takes, fails here rather than when someone next
measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fmnist_data import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]


@needs_fmnist
def test_step_cost_times_every_mode_and_variant(tmp_path):
    out = tmp_path / "cost.json"
    cmd = [sys.executable, "bench/step_cost.py", "--preset", "tiny", "--rounds", "2",
           "--repeats", "1", "--variant", "loss.recon_share=0.5 loss.adv_x_recon=0",
           "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    record = json.loads(out.read_text())
    steps = record["step_ms"]["current"]
    assert set(steps) == {"aegan", "gan", "aegan loss.recon_share=0.5 loss.adv_x_recon=0"}
    assert all(ms > 0 for ms in steps.values())
    assert set(record["pass_ms"]) == {"G", "E", "Dx", "Dz"}
    settings = record["loss_settings"]
    variant = settings["aegan loss.recon_share=0.5 loss.adv_x_recon=0"]
    assert (variant["recon_share"], variant["adv_x_recon"], variant["mode"]) == (0.5, 0, "aegan")
    assert (settings["aegan"]["recon_share"], settings["aegan"]["adv_x_recon"]) == (1.0, 1.0)
    assert settings["gan"]["mode"] == "gan"


def test_vectors_bench_trains_and_scores_one_run(tmp_path):
    """One short AEGAN run of bench/vectors.py on the ring, scored for modes like the table."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import vectors
    finally:
        sys.path.remove(str(ROOT / "bench"))
    sets = ["loss.adv_x_recon=0", "loss.recon_share=0.5"]
    job = {"mixture": "ring8", "mode": "aegan", "seed": 0, "steps": 20, "fresh": False,
           "sets": sets, "dir": str(tmp_path / "run")}  # fmt: skip
    result = vectors.run_one(job)
    assert result["steps"] == 20 and result["sets"] == job["sets"]
    assert 0 <= result["metrics"]["modes_captured"] <= 8
    assert 0 <= result["metrics"]["modes_high_quality"] <= 1
    assert sum(result["histogram"]) <= 2500
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["loss"]["adv_x_recon"] == 0 and config["loss"]["recon_share"] == 0.5


def test_vectors_bench_redoes_a_run_whose_settings_changed(tmp_path):
    """Run folders are named by mixture, mode, steps and seed only: a finished run is reused for
    the same settings and retrained when a setting (or the preset) differs."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import vectors
    finally:
        sys.path.remove(str(ROOT / "bench"))
    job = {"mixture": "ring8", "mode": "gan", "seed": 0, "steps": 10, "fresh": False,
           "sets": ["optim.lr_g=0.002"], "dir": str(tmp_path / "run")}  # fmt: skip
    vectors.run_one(job)
    done = tmp_path / "run" / "eval.json"
    stamp = done.stat().st_mtime_ns
    vectors.run_one(job)
    assert done.stat().st_mtime_ns == stamp  # reused
    vectors.run_one({**job, "sets": ["optim.lr_g=0.003"]})
    assert json.loads(done.read_text())["sets"] == ["optim.lr_g=0.003"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["optim"]["lr_g"] == 0.003


def test_step_cost_trainer_steps_with_every_loss_setting():
    """The bench's step takes the settings the training loop passes to the passes, so a timed
    variant is the step it names (a setting left out would time the default step)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import step_cost
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from types import SimpleNamespace

    from training import losses
    from training.config import from_preset

    calls: list[tuple] = []

    def forward(*args):
        calls.append(args[3:])
        return losses.forward(*args)

    spy = SimpleNamespace(**{k: getattr(losses, k) for k in dir(losses) if not k.startswith("_")})
    spy.forward = forward
    cfg = from_preset("vectors-mlp")
    cfg.data.source, cfg.train.batch_size = "mixture:ring8", 32
    cfg.loss.recon_share, cfg.loss.encoder_noise = 1.0, 0.3
    step_cost.Trainer(cfg, losses=spy).step()
    cfg.loss.recon_share, cfg.loss.encoder_noise = 0.25, 0.0
    step_cost.Trainer(cfg, losses=spy).step()
    cfg.loss.recon_share = 1.0
    step_cost.Trainer(cfg, losses=spy).step()
    assert calls == [(32, 0.3), (8,), ()]  # the last: a baseline revision's call


@pytest.mark.slow
@needs_fmnist
def test_similar_bench_runs_end_to_end_at_a_small_size(tmp_path):
    """bench/similar.py --quick: a gallery, /similar over HTTP, precision beside PCA, an IVF
    index; every figure is there and within its range."""
    out = tmp_path / "similar.json"
    cmd = [sys.executable, "bench/similar.py", "--quick", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900)
    record = json.loads(out.read_text())
    fmnist = record["fashion_mnist"]
    assert fmnist["gallery_images"] == 3000 and fmnist["index_kind"] == "exact"
    assert all(0 < p <= 1 for p in fmnist["precision_at_10"].values())
    assert set(fmnist["http_one_upload_k10"]) == {"/similar", "/encode"}
    synthetic = record["synthetic"]
    assert synthetic["recall_at_10"] >= 0.95 and synthetic["query"]["p50_ms"] > 0
    assert 1 < synthetic["index_over_raw"] < 2
