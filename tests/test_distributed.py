"""The same entry point under torchrun: two gloo processes on the CPU stay in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fmnist_data import needs_fmnist

from training.checkpoint import list_checkpoints, load_checkpoint
from training.training_loop import fingerprint


@needs_fmnist
def test_two_gloo_processes_hold_identical_weights(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("ddp_worker.py")), str(run_dir)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [(tmp_path / f"rank-{r}.txt").read_text() for r in (0, 1)]
    assert reports == [f"rank {r}: backend gloo, device cpu" for r in (0, 1)], result.stdout

    # exactly one checkpoint set, written by rank 0
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000002.pt", "step-0000004.pt"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "fakes-0000002.png", "fakes-0000004.png", "recon-0000002.png", "recon-0000004.png"
    ]  # fmt: skip
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [2, 4]

    # every rank reported the same weights, and they are the weights saved
    state = load_checkpoint(run_dir / "checkpoints" / "step-0000004.pt")
    prints = state["rank_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]
    assert len(state["rng"]["data"]) == 2

    from training.config import RunConfig
    from training.networks import build_networks

    cfg = RunConfig.from_dict(state["config"])
    nets = build_networks(cfg.model, cfg.loss.mode)
    for name, net in nets.items():
        net.load_state_dict(state["nets"][name])
    ema = {name: build_networks(cfg.model)[name] for name in state["ema"]}
    for name, net in ema.items():
        net.load_state_dict(state["ema"][name])
    assert fingerprint(nets, ema) == prints[0]
