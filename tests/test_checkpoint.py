"""Checkpoint files (training/checkpoint.py) on small hand-made states: names, order, pruning,
atomic writes, and each refusal naming the file. The training loop's own use of them (resume equal
to an uninterrupted run) is in tests/test_training.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import (
    FORMAT,
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def state(step: int) -> dict:
    return {"step": step, "config": {"seed": 1}, "nets": {"G": {"w": torch.ones(2)}}, "ema": {}}


def test_names_have_seven_digit_steps_and_sort_by_step(tmp_path):
    assert checkpoint_path(tmp_path, 42) == tmp_path / "checkpoints" / "step-0000042.pt"
    for step in (12_345_678, 9, 100):  # past seven digits the number still orders them
        save_checkpoint(state(step), tmp_path, keep=10)
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "checkpoints" / "step-12.pt").write_text("too few digits")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-0000009.pt", "step-0000100.pt", "step-12345678.pt"]
    assert list_checkpoints(tmp_path / "elsewhere") == []


def test_save_writes_the_state_with_its_format_marker_and_leaves_no_temp_file(tmp_path):
    path = save_checkpoint(state(3), tmp_path, keep=1)
    assert path == tmp_path / "checkpoints" / "step-0000003.pt"
    loaded = torch.load(path, weights_only=True)
    assert loaded["format"] == FORMAT == "aegan-checkpoint/1"
    assert loaded["step"] == 3 and torch.equal(loaded["nets"]["G"]["w"], torch.ones(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-0000003.pt"]


def test_save_keeps_only_the_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(state(step), tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004.pt", "step-0000005.pt"]


def test_a_failed_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(Exception, match="pickle|serializ|lambda"):
        save_checkpoint({**state(1), "config": lambda: 0}, tmp_path, keep=1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_load_refusals_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a readable checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"step": 1}, foreign)
    with pytest.raises(CheckpointError, match=r"no 'aegan-checkpoint/1' marker"):
        load_checkpoint(foreign)
    torch.save([1, 2], foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not an AEGAN checkpoint"):
        load_checkpoint(foreign)
    for key in ("step", "config", "nets", "ema"):
        partial = {"format": FORMAT, **state(1)}
        del partial[key]
        torch.save(partial, foreign)
        with pytest.raises(CheckpointError, match=rf"foreign\.pt: checkpoint lacks '{key}'"):
            load_checkpoint(foreign)


def test_resolve_takes_a_file_or_the_newest_loadable_checkpoint(tmp_path):
    first = save_checkpoint(state(1), tmp_path, keep=5)
    second = save_checkpoint(state(2), tmp_path, keep=5)
    assert resolve_checkpoint(first) == first  # a file as given
    assert resolve_checkpoint(tmp_path) == second
    second.write_bytes(second.read_bytes()[:100])  # truncated: skipped
    assert resolve_checkpoint(tmp_path) == first
    first.write_bytes(b"")
    with pytest.raises(CheckpointError, match="run directory holds no loadable checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint file or run directory"):
        resolve_checkpoint(Path(tmp_path / "nowhere"))
