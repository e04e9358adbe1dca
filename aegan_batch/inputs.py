"""What a SOURCE holds (a folder of images, a list of paths, an ``.npy`` array), reading one input
exactly as the service reads an upload, and encoding a batch of them in one encoder run."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from aegan_core.bundle import Bundle
from aegan_core.errors import ClientError, RequestError, UserError
from aegan_core.images import UploadLimits, decode_upload, to_model_input
from aegan_core.runtime import ModelRuntime

# Files a folder source contributes: the formats the service accepts (aegan_core.images).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")

Item = tuple[str, str]  # (label for messages, location: a file path or an .npy row index)


class JobError(UserError):
    """The source, the model or DEST cannot be used as asked; the message says why."""


def printable(text: str) -> str:
    """``text`` as it is stored and shown: file names that are not valid UTF-8 (held by Python
    with surrogate escapes, as :func:`os.fsdecode` gives them) get their stray bytes written as
    ``\\xNN``, e.g. ``bad\\xff.png`` for the name made of the bytes ``bad``, 0xFF, ``.png``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decoding gives
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Inputs:
    """What a SOURCE holds, in the job's order (sorted).

    One list of names for a folder or a list of paths (locations are built from it when read),
    a ``range`` for an ``.npy``: memory grows with the number of inputs by one string each, and
    not at all for an array."""

    kind: Literal["folder", "list", "npy"]
    source: Path  # resolved
    names: Sequence[str] | range  # relative path (surrogate-escaped), path as listed, row index
    base: str  # the folder names are relative to ("" for an .npy)
    names_sha256: str  # the names (as bytes) in order: which inputs
    contents_sha256: str  # and each one's size and modification time (or the .npy's header)
    array: dict[str, Any] | None = None  # an .npy: its size, mtime_ns, shape and dtype
    parts_sha256: list[str] | None = None  # files: contents_sha256 of each chunk's inputs (16 hex)

    def __len__(self) -> int:
        return len(self.names)

    def id(self, i: int) -> str | int:
        """The ``id`` column of input ``i``: printable path, or the row index."""
        name = self.names[i]
        return name if isinstance(name, int) else printable(name)

    def location(self, i: int) -> str:
        """Where input ``i`` is read from: an absolute path, or the row index."""
        name = self.names[i]
        return str(name) if isinstance(name, int) else os.path.join(self.base, name)


def list_inputs(source: str | os.PathLike[str], bundle: Bundle, chunk_size: int = 1000) -> Inputs:
    """The inputs of SOURCE: a folder of images (recursive, the service's formats; links to
    folders are not followed), a text file listing one path per line (relative to the file's
    folder; blank lines and ``#`` comments are skipped), or an ``.npy`` array (N x D vectors, or
    N x C x H x W images). ``chunk_size`` groups the fingerprints of files by part."""
    path = Path(source).resolve()
    if path.is_dir():
        _require_images(bundle, path)
        names = []
        for top, _, files in os.walk(path):
            folder = os.path.relpath(top, path).replace(os.sep, "/")
            for name in files:
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                    names.append(name if folder == "." else f"{folder}/{name}")
        names.sort()
        return _file_inputs("folder", path, str(path), names, chunk_size)
    if not path.is_file():
        raise JobError(f"{source}: no such file or folder")
    if path.suffix.lower() == ".npy":
        array = _open_array(path, bundle)
        status = path.stat()
        header = {
            "size": status.st_size,
            "mtime_ns": status.st_mtime_ns,
            "shape": list(array.shape),
            "dtype": array.dtype.str,
        }
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
        names_digest = hashlib.sha256(f"rows {len(array)}".encode()).hexdigest()
        return Inputs("npy", path, range(len(array)), "", names_digest, digest, header)
    _require_images(bundle, path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise JobError(f"{source}: not a readable list of paths ({exc})") from None
    listed = (os.fsdecode(line.strip()) for line in lines)
    names = sorted(s for s in listed if s and not s.startswith("#"))
    return _file_inputs("list", path, str(path.parent), names, chunk_size)


def _file_inputs(
    kind: Literal["folder", "list"], source: Path, base: str, names: list[str], chunk_size: int
) -> Inputs:
    """Inputs of files, with the fingerprints of their names and of each one's size and
    modification time, for all of them and per chunk (a file that cannot be examined counts as
    missing, and will be an error row when read)."""
    which, contents, part = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    parts = []
    for k, name in enumerate(names):
        try:
            status = os.stat(os.path.join(base, name))
            facts = f"{status.st_size} {status.st_mtime_ns}"
        except OSError:
            facts = "missing"
        encoded = os.fsencode(name)
        which.update(encoded + b"\0")
        entry = encoded + b"\0" + facts.encode() + b"\n"
        contents.update(entry)
        part.update(entry)
        if (k + 1) % chunk_size == 0 or k + 1 == len(names):
            parts.append(part.hexdigest()[:16])
            part = hashlib.sha256()
    return Inputs(
        kind, source, names, base, which.hexdigest(), contents.hexdigest(), parts_sha256=parts
    )


def _require_images(bundle: Bundle, source: Path) -> None:
    if bundle.kind != "image":
        raise JobError(
            f"{source}: model {bundle.name!r} is a vector model (data shape "
            f"{list(bundle.data_shape)}); give it an .npy array of vectors"
        )


# .npy sources opened (memory-mapped) by this process, by path, modification time and size.
_ARRAYS: dict[tuple[str, int, int], np.ndarray] = {}


def _mapped(path: str) -> np.ndarray:
    status = os.stat(path)
    key = (path, status.st_mtime_ns, status.st_size)
    if key not in _ARRAYS:
        _ARRAYS[key] = np.load(path, mmap_mode="r", allow_pickle=False)
    return _ARRAYS[key]


def _open_array(path: Path, bundle: Bundle) -> np.ndarray:
    """The .npy array, memory-mapped; its rows must have the model's data shape."""
    try:
        array = _mapped(str(path))
    except (OSError, ValueError) as exc:
        raise JobError(f"{path}: not a readable .npy array ({exc})") from None
    if tuple(array.shape[1:]) != bundle.data_shape:
        raise JobError(
            f"{path}: array of shape {array.shape}; model {bundle.name!r} takes rows of "
            f"shape {bundle.data_shape} (N x {' x '.join(map(str, bundle.data_shape))})"
        )
    if not (np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array)):
        raise JobError(f"{path}: dtype {array.dtype} is not real numbers")
    return array


# --- reading and encoding (the same in every worker, process, thread or Ray actor) ---------------


@dataclass(frozen=True)
class FileReader:
    """Image files -> model input, exactly as ``/encode`` converts uploads, with its limits."""

    shape: tuple[int, int, int]
    max_bytes: int
    max_pixels: int

    def read(self, label: str, location: str) -> np.ndarray:
        image = decode_upload(
            Path(location),
            label=label,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            draft_size=max(self.shape[1:]),
        )
        return to_model_input(image, self.shape)


@dataclass(frozen=True)
class ArrayReader:
    """Rows of an .npy array -> model input, as training reads arrays: vectors as stored, images
    as uint8 0..255 or floats in [0, 1], mapped to [-1, 1]."""

    path: str  # checked by list_inputs: rows of the model's data shape, real numbers

    def read(self, label: str, location: str) -> np.ndarray:
        row = np.asarray(_mapped(self.path)[int(location)])
        if not np.all(np.isfinite(row)):
            raise RequestError(f"row {label} holds NaN or infinite values")
        if row.ndim == 1:  # a vector
            return row.astype(np.float32)
        if row.dtype == np.uint8:
            return row.astype(np.float32) / 127.5 - 1.0  # as to_model_input maps 8-bit pixels
        if row.min() < 0 or row.max() > 1:
            raise RequestError(f"row {label}: float images must lie in [0, 1]")
        return row.astype(np.float32) * 2 - 1


Reader = FileReader | ArrayReader


def reader_for(inputs: Inputs, bundle: Bundle, limits: UploadLimits) -> Reader:
    """How the job reads its inputs: rows of the array, or files decoded as uploads."""
    if inputs.kind == "npy":
        return ArrayReader(str(inputs.source))
    shape = bundle.data_shape
    if len(shape) != 3:  # list_inputs refuses files for a vector model
        raise JobError(f"model {bundle.name!r} takes vectors of shape {list(shape)}, not images")
    return FileReader((shape[0], shape[1], shape[2]), limits.max_upload_bytes, limits.max_pixels)


def encode_items(
    model: ModelRuntime, reader: Reader, items: Sequence[Item]
) -> tuple[np.ndarray, list[str | None]]:
    """Read and encode ``items`` in one encoder run: (latents (N, latent_dim), error per item).
    An input that cannot be read or converted gets its error message (and a latent of zeros)
    instead of stopping the job: the service's message for a bad upload, the reason a file could
    not be read, or ``LABEL: TypeName: message`` for any other exception."""
    latents = np.zeros((len(items), model.bundle.latent_dim), np.float32)
    errors: list[str | None] = [None] * len(items)
    good, arrays = [], []
    for k, (label, location) in enumerate(items):
        try:
            arrays.append(reader.read(label, location))
            good.append(k)
        except ClientError as exc:  # the service's answer to this upload would be this 4xx
            errors[k] = printable(exc.message)
        except OSError as exc:  # unreadable file: permissions, vanished, a folder, I/O error
            errors[k] = printable(f"{label} could not be read: {exc.strerror or exc}")
        except Exception as exc:  # conversion: MemoryError, a codec's or numpy's ValueError, ...
            errors[k] = printable(f"{label}: {type(exc).__name__}: {exc}")
    if arrays:
        latents[good] = model.encode(np.stack(arrays))
    return latents, errors
