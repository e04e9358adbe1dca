"""Class coverage: how evenly generated samples spread over Fashion-MNIST's ten classes.

Each sample gets the classifier's most likely class. A model that drops modes piles its samples
into few classes: the KL divergence of the class histogram from uniform grows (0 for a perfectly
balanced model, ln 10 ≈ 2.30 nats when one class takes everything) and fewer classes hold at least
5 % of the samples (10 at best). The test split is balanced, 1000 images per class.
"""

from __future__ import annotations

import numpy as np

from training.data import FASHION_MNIST_CLASSES
from training.metrics.registry import EvalContext, register_metric

NUM_CLASSES = len(FASHION_MNIST_CLASSES)
MIN_SHARE = 0.05


def class_histogram(predicted: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Share of samples per class, (num_classes,) summing to 1."""
    counts = np.bincount(np.asarray(predicted), minlength=num_classes)[:num_classes]
    return counts / max(1, counts.sum())


def kl_to_uniform(shares: np.ndarray) -> float:
    """KL(shares || uniform) in nats; empty classes contribute nothing."""
    p = np.asarray(shares, dtype=np.float64)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] * len(p))))


def named_shares(shares: np.ndarray) -> dict[str, float]:
    """Class shares by class name, rounded for reports."""
    return {
        name: round(float(share), 4)
        for name, share in zip(FASHION_MNIST_CLASSES, shares, strict=True)
    }


def classes_covered(shares: np.ndarray, min_share: float = MIN_SHARE) -> int:
    return int(np.sum(np.asarray(shares) >= min_share))


@register_metric(
    "coverage",
    reference="fmnist",
    results={
        "coverage_kl": "KL of predicted-class shares from uniform, nats (0 best, 2.30 worst)",
        "coverage_classes": f"classes holding >= {MIN_SHARE:.0%} of samples (of {NUM_CLASSES})",
    },
)
def coverage(ctx: EvalContext) -> dict[str, float]:
    shares = class_histogram(ctx.fake_features_and_logits[1].argmax(1))
    ctx.details["class_shares"] = named_shares(shares)
    return {"coverage_kl": kl_to_uniform(shares), "coverage_classes": classes_covered(shares)}
