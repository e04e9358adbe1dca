"""The Fashion-MNIST classifier whose features the image metrics are measured in.

Inception weights cannot be downloaded here, so the project trains its own small CNN on the
Fashion-MNIST training split and ships the weights (``fmnist_classifier.pt``, about 1 MB) with
the test accuracy and the command that made them (``fmnist_classifier.json``). Its penultimate
layer (128 units after ReLU) is the feature space of FD-FMNIST, precision and recall; its argmax is
the class used by the coverage metric.

Retrain (deterministic on the CPU; about ten minutes on one shared core)::

    aegan classifier --epochs 7 --threads 1 --seed 0
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aegan_core.errors import UserError
from training.data import FASHION_MNIST_CLASSES

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "fmnist_classifier.pt"
FORMAT = "aegan-fmnist-classifier/1"
NUM_CLASSES = len(FASHION_MNIST_CLASSES)
FEATURE_DIM = 128


# --- network --------------------------------------------------------------------------------


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, then halve the resolution (rounding up: 7 px -> 4 px keeps the
    border rows that Fashion-MNIST items fill)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
    )


class FMNISTClassifier(nn.Module):
    """Three conv blocks, a 128-unit feature layer and a linear head; input (B, 1, 28, 28) in
    [-1, 1], the training pipeline's pixel range."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_block(1, width), conv_block(width, 2 * width), conv_block(2 * width, 4 * width)
        )
        self.embed = nn.Sequential(nn.Linear(4 * width * 4 * 4, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, 4W, 4, 4)
        return self.embed(h.flatten(1))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, 10) logits


# --- loading and applying -------------------------------------------------------------------


class ClassifierError(UserError, RuntimeError):
    """The classifier weights are missing or unreadable; the message says how to rebuild them."""


@lru_cache(maxsize=2)
def load_classifier(path: str | None = None) -> FMNISTClassifier:
    """The shipped classifier (or the one at ``path``), in eval mode. Cached per path."""
    weights = Path(path) if path else WEIGHTS
    if not weights.is_file():
        raise ClassifierError(
            f"{weights}: classifier weights not found; rebuild them with `aegan classifier`"
        )
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ClassifierError(f"{weights}: not a Fashion-MNIST classifier ({FORMAT!r} expected)")
    try:
        net = FMNISTClassifier(**state["arch"])
        net.load_state_dict(state["weights"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ClassifierError(f"{weights}: weights do not fit this classifier ({exc})") from exc
    return net.eval().requires_grad_(False)


def classifier_info(path: str | None = None) -> dict[str, Any]:
    """The record written beside the weights: accuracy, command, hash of the weights."""
    weights = Path(path) if path else WEIGHTS
    record = weights.with_suffix(".json")
    return json.loads(record.read_text()) if record.is_file() else {"weights": str(weights)}


@torch.no_grad()
def features_and_logits(
    net: FMNISTClassifier, images: torch.Tensor | np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N, 128) and logits (N, 10), float64, of images (N, 1, 28, 28) in
    [-1, 1]."""
    x = torch.as_tensor(images, dtype=torch.float32)
    feats, logits = [], []
    for start in range(0, len(x), batch_size):
        f = net.features(x[start : start + batch_size])
        feats.append(f)
        logits.append(net.head(f))
    return torch.cat(feats).double().numpy(), torch.cat(logits).double().numpy()


# --- training -------------------------------------------------------------------------------


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (every class is left-right symmetric in distribution)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    correct = sum(
        int((net(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum())
        for i in range(0, len(images), 1000)
    )
    return correct / len(images)


@torch.no_grad()
def per_class_recall(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Share of each class's images that the classifier assigns to that class."""
    net.eval()
    predicted = torch.cat(
        [net(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)]
    )
    return [float((predicted[labels == c] == c).float().mean()) for c in range(10)]


def report(data_dir: str, path: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Parameter count, test accuracy and per-class test recall of the shipped (or given)
    weights (on ``threads`` torch threads when given)."""
    from training.data import FASHION_MNIST_CLASSES, load_fashion_mnist

    if threads:
        torch.set_num_threads(threads)

    net = load_classifier(path)
    test = load_fashion_mnist(data_dir, "test")
    recalls = per_class_recall(net, test.samples, test.labelled())
    return {
        "parameters": sum(p.numel() for p in net.parameters()),
        "test_accuracy": round(accuracy(net, test.samples, test.labelled()), 4),
        "test_recall_per_class": {
            name: round(r, 4) for name, r in zip(FASHION_MNIST_CLASSES, recalls, strict=True)
        },
    }


def train_classifier(
    data_dir: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Any = print,
) -> tuple[FMNISTClassifier, dict[str, Any]]:
    """Adam with a one-cycle learning rate on the training split; accuracy on the test split."""
    from training.data import load_fashion_mnist

    torch.manual_seed(seed)
    train, test = load_fashion_mnist(data_dir, "train"), load_fashion_mnist(data_dir, "test")
    train_labels = train.labelled()
    net = FMNISTClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = _augment(train.samples[idx], gen)
            loss = F.cross_entropy(net(x), train_labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(net, test.samples, test.labelled())
        log(
            f"epoch {epoch + 1}/{epochs}: test accuracy {acc:.4f} "
            f"({time.perf_counter() - start:.0f} s)"
        )
    stats = {
        "test_accuracy": round(accuracy(net, test.samples, test.labelled()), 4),
        "train_accuracy": round(accuracy(net, train.samples, train.labelled()), 4),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return net.eval(), stats


def train_and_record(
    out: Path | None,
    fashion_mnist_dir: str | None,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    threads: int,
    log: Any = print,
) -> dict[str, Any]:
    """``aegan classifier``: train deterministically, save the weights at ``out`` (default: the
    shipped file) and the record beside them as .json; returns the record."""
    from training.config import DataConfig
    from training.config import fashion_mnist_dir as resolve_dir

    out = out or WEIGHTS
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    data_dir = resolve_dir(DataConfig(fashion_mnist_dir=fashion_mnist_dir))
    net, stats = train_classifier(data_dir, epochs, batch_size, lr, seed, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = {"width": 32, "feature_dim": FEATURE_DIM}
    torch.save({"format": FORMAT, "arch": arch, "weights": net.state_dict()}, out)
    command = (
        f"aegan classifier --epochs {epochs} --batch-size {batch_size} "
        f"--lr {lr:g} --seed {seed} --threads {threads}"
    )
    record = {
        "weights": out.name,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "bytes": out.stat().st_size,
        "arch": arch,
        "features": "penultimate layer, 128 units after ReLU",
        **stats,
        "command": command,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {threads} thread(s)",
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record
