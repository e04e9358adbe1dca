"""Crash-safe file writes, shared by the training run files, the bundle export and batch encoding:
a file is replaced whole or not at all (temporary file beside it, fsync, rename, fsync of the
folder). Standard library only."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"  # temporary files of writes in progress; a crash may leave them behind


def fsync_dir(folder: Path, *, files: bool = False) -> None:
    """Flush a directory's entries (and, with ``files``, the files in it) to disk. POSIX; a no-op
    where a directory cannot be opened."""
    if files:
        for path in folder.iterdir():
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, write: Callable[[BinaryIO], object], suffix: str = "") -> None:
    """Replace ``path`` with what ``write`` writes to a file, so that a crash leaves the old file
    or the new one, whole: a temporary file beside it, fsync, rename, fsync of the folder."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, atomically (see :func:`replace_file`)."""
    replace_file(path, lambda f: f.write(data))
