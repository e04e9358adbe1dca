"""Where the tests find Fashion-MNIST: exactly where the code looks (``--fashion-mnist-dir`` aside,
``$AEGAN_FASHION_MNIST_DIR``, then Debian's ``/usr/share/datasets/fashion-mnist``).

Tests that read it carry ``@needs_fmnist`` (the ``fmnist`` marker). Without the dataset they are
skipped on a developer's machine and fail in CI (``CI=true``): CI installs it, so a missing dataset
there is a broken setup, not a reason to run less.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.config import DataConfig, fashion_mnist_dir

FMNIST = Path(fashion_mnist_dir(DataConfig()))
FMNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
needs_fmnist = pytest.mark.fmnist


def fmnist_missing() -> str | None:
    """Why the dataset cannot be read from :data:`FMNIST`, or None when it can."""
    missing = [name for name in FMNIST_FILES if not (FMNIST / name).is_file()]
    if missing:
        return f"Fashion-MNIST not found in {FMNIST} (missing {', '.join(missing)})"
    return None


def require_fmnist() -> None:
    """Skip (or, in CI, fail) the calling test when the dataset is not there."""
    reason = fmnist_missing()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must have it (scripts/setup.sh installs it)", pytrace=False)
    pytest.skip(f"{reason}; install dataset-fashion-mnist or set AEGAN_FASHION_MNIST_DIR")
