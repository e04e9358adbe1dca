"""Datasets: Fashion-MNIST (IDX files), folders of images, .npy arrays, and the built-in
mixtures of Gaussians (``mixture:NAME``, :mod:`training.mixtures`).

Every loader returns a :class:`Dataset` held in memory: ``samples`` as float32, images laid out
(N, C, H, W) in [-1, 1], vectors (N, D) as stored. Bad data raises :class:`DataError` naming the
path and the problem. Nothing is downloaded: Fashion-MNIST is read from a local directory.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from aegan_core.errors import UserError
from aegan_core.images import to_model_input
from training.config import DataConfig, fashion_mnist_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ImageSplit = Literal["all", "train", "held-out"]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataError(UserError, ValueError):
    """The data at a path cannot be used; the message names the path and the problem."""


@dataclass
class Dataset:
    samples: torch.Tensor  # (N, C, H, W) in [-1, 1] for images, (N, D) for vectors; float32.
    labels: torch.Tensor | None  # (N,) int64 class labels where the source has them.
    kind: Literal["image", "vector"]

    def labelled(self) -> torch.Tensor:
        """The class labels (a data set without them is a caller's mistake)."""
        if self.labels is None:
            raise ValueError(f"{self.source} has no class labels")
        return self.labels

    source: str  # Where it came from, for logs and manifests.

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape[1:])

    def __len__(self) -> int:
        return self.samples.shape[0]


def uint8_to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 pixels (N, C, H, W) -> float32 in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)


# --- Fashion-MNIST ---------------------------------------------------------------------------


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    stat = path.stat()
    return _read_idx_cached(path.resolve(), stat.st_mtime_ns, stat.st_size, expected_dims)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: Path, mtime_ns: int, size: int, expected_dims: int) -> np.ndarray:
    """Evaluation and short runs read the same files many times: cache them per process, keyed
    by modification time and size so that a changed file is read again. Read-only arrays."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise DataError(f"{path}: not an IDX file of unsigned bytes with {expected_dims} dims")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: holds {data.size} bytes of data, header says {dims}")
    return data.reshape(dims)


def load_fashion_mnist_arrays(
    directory: str | Path, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST: uint8 images (N, 28, 28) and int64 labels (N,) of a split, as read-only
    arrays (files are cached per process, see :func:`_read_idx`)."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = Path(directory)
    if not root.is_dir():
        raise DataError(
            f"{root}: Fashion-MNIST directory not found (install Debian's dataset-fashion-mnist, "
            "or point --fashion-mnist-dir / $AEGAN_FASHION_MNIST_DIR at the four IDX .gz files)"
        )
    image_file, label_file = FASHION_MNIST_FILES[split]
    images = _read_idx(root / image_file, 3)
    labels = _read_idx(root / label_file, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels in {split} split")
    return images, labels


def load_fashion_mnist(directory: str | Path, split: str = "train") -> Dataset:
    images, labels = load_fashion_mnist_arrays(directory, split)
    return Dataset(
        samples=uint8_to_unit(images[:, None]),
        labels=torch.from_numpy(labels.copy()),
        kind="image",
        source=f"fashion-mnist:{split}",
    )


# --- Folders of images -----------------------------------------------------------------------


def _load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file -> (C, size, size) float32 in [-1, 1], converted exactly as the service
    converts uploads (EXIF orientation, alpha onto white, centre crop, Lanczos resize)."""
    with Image.open(path) as img:
        img.load()
        return to_model_input(ImageOps.exif_transpose(img), (channels, size, size))


def is_held_out(relative_path: str, share: float) -> bool:
    """Whether an image of a folder belongs to its held-out split: the first 8 bytes of the
    SHA-256 of its path relative to the folder (POSIX form), read as a fraction, fall below
    ``share``. Deterministic, and an image keeps its side when others are added or removed."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def image_paths(root: Path, split: ImageSplit = "all", held_out: float = 0.0) -> list[Path]:
    """The folder's images (recursive, sorted), or those of its training or held-out split."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if split == "all":
        return paths
    want = split == "held-out"
    return [p for p in paths if is_held_out(p.relative_to(root).as_posix(), held_out) == want]


def load_image_folder(
    directory: str | Path,
    size: int,
    channels: int,
    on_bad_file: str = "fail",
    split: ImageSplit = "all",
    held_out: float = 0.0,
) -> Dataset:
    """The PNG/JPEG/WebP images below ``directory`` (recursive, sorted), centre-cropped and
    resized: all of them, or the training or held-out split of a ``held_out`` share
    (:func:`is_held_out`)."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"{root}: image directory not found")
    paths = image_paths(root, split, held_out)
    if not paths:
        if split != "all" and image_paths(root):
            raise DataError(
                f"{root}: its {split} split is empty (held-out share {held_out:g}); "
                "change data.held_out"
            )
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    arrays, bad = [], []
    for path in paths:
        try:
            arrays.append(_load_image(path, size, channels))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            if on_bad_file == "fail":
                raise DataError(f"{path}: unreadable image ({exc})") from exc
            bad.append(path)
    if bad:
        log.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(bad), root, bad[0])
    if not arrays:
        raise DataError(f"{root}: every image was unreadable ({len(bad)} skipped)")
    source = str(root) if split == "all" else f"{root} ({split} split, held-out share {held_out:g})"
    return Dataset(torch.from_numpy(np.stack(arrays)), None, "image", source)


# --- .npy arrays -----------------------------------------------------------------------------


def load_npy(path: str | Path) -> Dataset:
    """N x D float vectors, or N x C x H x W images (uint8 0..255, or float in [0, 1])."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from exc
    if array.ndim not in (2, 4):
        raise DataError(
            f"{path}: array of rank {array.ndim} {array.shape}; expected N x D vectors "
            "or N x C x H x W images"
        )
    if len(array) < 2:
        raise DataError(f"{path}: needs at least 2 samples, has {len(array)}")
    if not (np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array)):
        raise DataError(f"{path}: dtype {array.dtype} is not real numbers")
    if not np.all(np.isfinite(array)):
        bad = int(np.sum(~np.isfinite(array)))
        raise DataError(f"{path}: holds {bad} NaN or infinite value(s)")
    if array.ndim == 2:
        return Dataset(torch.from_numpy(array.astype(np.float32)), None, "vector", str(path))
    if array.shape[1] not in (1, 3):
        raise DataError(
            f"{path}: images must have 1 or 3 channels (N x C x H x W), got {array.shape}"
        )
    if array.dtype == np.uint8:
        samples = uint8_to_unit(array)
    else:
        if array.min() < 0 or array.max() > 1:
            raise DataError(f"{path}: float images must lie in [0, 1]")
        samples = torch.from_numpy(array.astype(np.float32) * 2 - 1)
    return Dataset(samples, None, "image", str(path))


# --- built-in mixtures of Gaussians ---------------------------------------------------------


def load_mixture(source: str, split: str = "train") -> Dataset:
    """A built-in mixture (``mixture:ring8``): the seeded training draw, or the held-out draw of
    another seed. Labels are the mode each sample came from."""
    from training.mixtures import HELD_OUT_SEED, TRAIN_SAMPLES, TRAIN_SEED, get_mixture

    try:
        mixture = get_mixture(source)
    except KeyError as exc:
        raise DataError(f"{source}: {exc.args[0]}") from exc
    seed = {"train": TRAIN_SEED, "held-out": HELD_OUT_SEED}[split]
    samples, modes = mixture.sample(TRAIN_SAMPLES, seed)
    return Dataset(torch.from_numpy(samples), torch.from_numpy(modes), "vector", source)


def load_dataset(cfg: DataConfig) -> Dataset:
    """The training data a config names."""
    from training.mixtures import MIXTURE_PREFIX

    source = cfg.source
    if source == "fashion-mnist":
        data = load_fashion_mnist(fashion_mnist_dir(cfg), "train")
    elif source.startswith(MIXTURE_PREFIX):
        data = load_mixture(source)
    elif source.endswith(".npy"):
        data = load_npy(source)
    else:
        split: ImageSplit = "train" if cfg.held_out > 0 else "all"
        data = load_image_folder(
            source, cfg.image_size, cfg.channels, cfg.on_bad_file, split, cfg.held_out
        )
    if cfg.limit is not None:
        data = Dataset(
            data.samples[: cfg.limit],
            None if data.labels is None else data.labels[: cfg.limit],
            data.kind,
            data.source,
        )
    return data
