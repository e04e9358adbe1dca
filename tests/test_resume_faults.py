"""Resume after a crash in the middle of a write: a cut-off last record of metrics.jsonl."""

from __future__ import annotations

import json

import numpy as np

from training.config import from_preset, validate
from training.training_loop import train


def test_resume_after_a_record_cut_off_mid_write(tmp_path):
    data = tmp_path / "images.npy"
    rng = np.random.default_rng(0)
    np.save(data, rng.uniform(0, 1, (64, 1, 28, 28)).astype(np.float32))
    cfg = from_preset("tiny")
    cfg.data.source = str(data)
    cfg.train.progress = False
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 6, 2, 3
    cfg.train.image_every = 3
    run = tmp_path / "run"
    train(validate(cfg), run)
    (run / "checkpoints" / "step-0000006.pt").unlink()  # killed after step 3's checkpoint ...
    history = run / "metrics.jsonl"
    history.write_text(history.read_text() + '{"step": 8, "loss/D/to')  # ... mid-write of a record
    train(None, run, resume=True)
    steps = [json.loads(line)["step"] for line in history.read_text().splitlines()]
    assert steps == [2, 4, 6]
    assert not list(run.glob(".tmp-*"))  # the history was replaced through a temporary file
