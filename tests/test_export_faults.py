"""Export under faults: the disk fills up part-way, the move into place fails or is interrupted.
The previous bundle stays whole and loadable, and nothing partial is left beside it."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from aegan_core.bundle import load_bundle
from export import bundle_writer
from export.bundle_writer import export_bundle
from training.config import from_preset, validate
from training.training_loop import train


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def contents(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    data = folder / "images.npy"
    np.save(data, np.random.default_rng(0).uniform(0, 1, (64, 1, 28, 28)).astype(np.float32))
    cfg = from_preset("tiny")
    cfg.data.source = str(data)
    cfg.model.hidden = 16
    cfg.train.steps, cfg.train.image_every, cfg.train.checkpoint_every = 3, 0, 0
    cfg.train.progress = False
    train(validate(cfg), folder / "run")
    return folder / "run"


@pytest.fixture(scope="module")
def previous(run_dir, tmp_path_factory) -> Path:
    """A good bundle, named "previous"."""
    out = tmp_path_factory.mktemp("bundles") / "previous"
    return export_bundle(run_dir, out, name="previous", fp16=False)


@pytest.fixture
def out(previous, tmp_path) -> Path:
    """A copy of the good bundle where the next export goes (with force=True)."""
    return Path(shutil.copytree(previous, tmp_path / "bundle"))


def assert_previous_intact(out: Path, before: dict[str, str]) -> None:
    assert contents(out) == before
    assert load_bundle(out).name == "previous"  # loads, hashes verified
    assert leftovers(out.parent) == []


def disk_full(path: Path, data: bytes) -> OSError:
    """Write part of ``data`` to ``path`` as a full disk would, and return the error to raise."""
    path.write_bytes(data[: len(data) // 2])
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_while_writing_a_graph_keeps_the_previous_bundle(run_dir, out, monkeypatch):
    before, real_save, saved = contents(out), onnx.save, []

    def save(model, path, *args, **kwargs):
        saved.append(Path(path).name)
        if len(saved) < 2:
            return real_save(model, path, *args, **kwargs)
        raise disk_full(Path(path), model.SerializeToString())

    monkeypatch.setattr(onnx, "save", save)
    with pytest.raises(OSError) as failure:
        export_bundle(run_dir, out, name="new", fp16=False, force=True)
    assert failure.value.errno == errno.ENOSPC and saved == ["generator.onnx", "encoder.onnx"]
    assert_previous_intact(out, before)


@pytest.fixture
def small_disk(tmp_path, previous) -> Path:
    """A tmpfs with room for the good bundle and half of another (root only; unmounted after)."""
    mount = tmp_path / "small"
    mount.mkdir()
    size = sum(p.stat().st_size for p in previous.iterdir())
    kib = (size + size // 2) // 1024 + 64  # tmpfs rounds up to pages: some slack
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_keeps_the_previous_bundle(run_dir, previous, small_disk):
    out = Path(shutil.copytree(previous, small_disk / "bundle"))
    before = contents(out)
    with pytest.raises(OSError) as failure:
        export_bundle(run_dir, out, name="new", fp16=False, force=True)
    assert failure.value.errno == errno.ENOSPC
    assert_previous_intact(out, before)
    assert sorted(p.name for p in small_disk.iterdir()) == ["bundle"]


def test_a_failed_final_rename_restores_the_previous_bundle(run_dir, out, monkeypatch):
    """Where an atomic swap is unavailable the old bundle is moved aside first: if the new one
    then cannot be renamed into place, the old one is put back."""
    before, real_rename = contents(out), os.rename

    def rename(src, dst):
        if ".partial-" in Path(src).name and Path(dst) == out:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(bundle_writer, "_exchange", lambda a, b: False)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        export_bundle(run_dir, out, name="new", fp16=False, force=True)
    assert_previous_intact(out, before)


def _can_exchange(folder: Path) -> bool:
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    try:
        return bundle_writer._exchange(folder / "a", folder / "b")
    finally:
        shutil.rmtree(folder / "a")
        shutil.rmtree(folder / "b")


def test_the_new_bundle_replaces_the_old_in_one_atomic_step(run_dir, out, monkeypatch):
    """Interrupted right after the swap (as by a crash), ``out`` already holds the whole new
    bundle: there is no moment at which it holds no bundle. The old one is cleaned up."""
    if not _can_exchange(out.parent):
        pytest.skip("no atomic exchange of directories on this system")
    swapped = []

    def exchange_then_stop(a, b):
        swapped.append(bundle_writer_exchange(a, b))
        raise KeyboardInterrupt

    bundle_writer_exchange = bundle_writer._exchange
    monkeypatch.setattr(bundle_writer, "_exchange", exchange_then_stop)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(run_dir, out, name="new", fp16=False, force=True)
    assert swapped == [True]
    assert load_bundle(out).name == "new" and leftovers(out.parent) == []
