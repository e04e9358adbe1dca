"""Resume after a crash at any moment: in the middle of a metrics record, before the first
checkpoint, inside a checkpoint write; and the SIGKILL loop of bench/kill_training.py (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from aegan_cli import main
from training.checkpoint import load_checkpoint
from training.config import RunConfig, from_preset, validate
from training.training_loop import train

REPO = Path(__file__).resolve().parent.parent


def tiny_config(data: Path) -> RunConfig:
    cfg = from_preset("tiny")
    cfg.data.source = str(data)
    cfg.train.progress = False
    cfg.train.deterministic = True  # the runs are compared bit for bit, on a GPU too
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 6, 2, 3
    cfg.train.image_every = 3
    return validate(cfg)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data") / "images.npy"
    rng = np.random.default_rng(0)
    np.save(data, rng.uniform(0, 1, (64, 1, 28, 28)).astype(np.float32))
    return data


def final_state(path: Path) -> dict[str, dict]:
    state = load_checkpoint(path)
    return {group: state[group] for group in ("nets", "ema", "optim", "rng")}


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory) -> dict[str, dict]:
    """The final state of an uninterrupted run."""
    return final_state(train(tiny_config(images), tmp_path_factory.mktemp("straight")))


def assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_record_cut_off_mid_write(tmp_path, images):
    run = tmp_path / "run"
    train(tiny_config(images), run)
    (run / "checkpoints" / "step-0000006.pt").unlink()  # killed after step 3's checkpoint ...
    history = run / "metrics.jsonl"
    history.write_text(history.read_text() + '{"step": 8, "loss/D/to')  # ... mid-write of a record
    train(None, run, resume=True)
    assert logged_steps(run) == [2, 4, 6]
    assert not list(run.glob(".tmp-*"))  # the history was replaced through a temporary file


def test_resume_of_a_run_killed_inside_its_first_checkpoint_write(tmp_path, images, straight):
    """Killed while step 3's checkpoint was half written: the run holds its config, two records
    and a cut-off temporary file, but no checkpoint. Resume starts again from step 0 and ends
    where an uninterrupted run ends; the temporary file is removed."""
    run = tmp_path / "run"
    train(tiny_config(images), run)
    written = run / "checkpoints" / "step-0000003.pt"
    (run / "checkpoints" / ".tmp-cut.pt").write_bytes(written.read_bytes()[:5000])
    for path in (run / "checkpoints").glob("step-*.pt"):
        path.unlink()
    history = run / "metrics.jsonl"
    history.write_text("".join(history.read_text().splitlines(keepends=True)[:1]))
    dry = CliRunner().invoke(main, ["train", "--resume", str(run), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output) == json.loads((run / "config.json").read_text())
    resumed = CliRunner().invoke(main, ["train", "--resume", str(run)])  # as `aegan train`
    assert resumed.exit_code == 0, resumed.output
    assert_same(straight, final_state(run / "checkpoints" / "step-0000006.pt"))
    assert logged_steps(run) == [2, 4, 6]
    assert not list(run.glob("checkpoints/.tmp-*"))


def test_resume_removes_cut_off_checkpoint_writes(tmp_path, images, straight):
    run = tmp_path / "run"
    train(tiny_config(images), run)
    last = run / "checkpoints" / "step-0000006.pt"
    (run / "checkpoints" / ".tmp-cut.pt").write_bytes(last.read_bytes()[:5000])
    (run / ".tmp-history").write_text('{"step": 2')
    last.unlink()
    assert_same(straight, final_state(train(None, run, resume=True)))
    assert not list(run.glob(".tmp-*")) and not list(run.glob("checkpoints/.tmp-*"))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """bench/kill_training.py with 3 trials (one killed inside a checkpoint write)."""
    report_path = tmp_path / "kill.json"
    cmd = [sys.executable, str(REPO / "bench" / "kill_training.py"), "--trials", "3"]
    done = subprocess.run(
        [*cmd, "--json", str(report_path)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    summary = report["summary"]
    assert summary["trials"] == summary["completed"] == summary["equal"] == 3
    assert summary["kills"] >= 3 and summary["kills_in_checkpoint_write"] >= 1
    assert summary["leftover_temp_files"] == 0
