"""Crash-safe file writes (aegan_core/files.py): a file is replaced whole or not at all, through a
temporary file beside it whose name the stale-file clean-ups know (TEMP_PREFIX)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aegan_core import files
from aegan_core.files import TEMP_PREFIX, fsync_dir, replace_file, write_atomic


def test_a_file_is_replaced_through_a_named_temporary_file_beside_it(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    seen = []

    def write(f):
        seen.extend(sorted(os.listdir(tmp_path)))
        f.write(b"new")

    replace_file(target, write, suffix=".pt")
    assert target.read_bytes() == b"new"
    assert len(seen) == 2 and seen[1] == "state.pt"  # the old file is there while writing
    assert seen[0].startswith(TEMP_PREFIX) and seen[0].endswith(".pt")
    assert os.listdir(tmp_path) == ["state.pt"]
    write_atomic(target, b"newer")
    assert target.read_bytes() == b"newer" and os.listdir(tmp_path) == ["state.pt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="^disk full$"):
        replace_file(target, write)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.json"]


def test_a_failure_after_the_rename_is_raised_as_it_is(tmp_path, monkeypatch):
    """The temporary file is gone by then (renamed): removing it must not hide the error."""

    def fail(folder: Path, **_) -> None:
        raise OSError("folder sync failed")

    monkeypatch.setattr(files, "fsync_dir", fail)
    target = tmp_path / "state.json"
    with pytest.raises(OSError, match="^folder sync failed$"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"new"


def test_fsync_dir_flushes_a_folder_and_its_files(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"graph")
    (tmp_path / "sub").mkdir()  # folders in it are left alone
    fsync_dir(tmp_path, files=True)
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # a folder that cannot be opened: nothing to do
    assert (tmp_path / "a.onnx").read_bytes() == b"graph"
