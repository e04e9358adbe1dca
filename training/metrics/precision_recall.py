"""Improved precision and recall (Kynkäänniemi et al. 2019), k-nearest-neighbour manifolds.

Each set's manifold is the union of balls around its points, each ball reaching the point's k-th
nearest neighbour in the same set. Precision is the fraction of generated samples inside the real
manifold (are samples realistic?); recall is the fraction of real samples inside the generated
manifold (is the data's variety covered?). Measured in classifier features, k = 3, with as many
real samples (a fixed subset of the test split) as generated ones.
"""

from __future__ import annotations

import numpy as np
import torch

from training.metrics.registry import EvalContext, register_metric

K = 3
_CHUNK = 1000


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), clamped at zero."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def knn_radii(points: torch.Tensor, k: int = K) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point of the same set."""
    radii = [
        # The point itself is among its own distances (zero), hence k + 1.
        torch.kthvalue(_sq_dists(points[i : i + _CHUNK], points), k + 1, dim=1).values
        for i in range(0, len(points), _CHUNK)
    ]
    return torch.cat(radii)


def _inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each query: does any centre's ball (squared radius ``radii``) contain it?"""
    return torch.cat(
        [
            (_sq_dists(queries[i : i + _CHUNK], centres) <= radii[None]).any(1)
            for i in range(0, len(queries), _CHUNK)
        ]
    )


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K) -> tuple[float, float]:
    """(precision, recall) of ``fake`` features (N, D) against ``real`` features (M, D)."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    r = torch.as_tensor(real, dtype=torch.float64)
    f = torch.as_tensor(fake, dtype=torch.float64)
    precision = _inside(f, r, knn_radii(r, k)).double().mean().item()
    recall = _inside(r, f, knn_radii(f, k)).double().mean().item()
    return precision, recall


def _cached(ctx: EvalContext) -> tuple[float, float]:
    if "precision_recall" not in ctx.cache:
        assert ctx.reference is not None
        real_all, _ = ctx.reference.features_and_logits
        real = real_all[ctx.reference.order[: ctx.num_samples]]
        ctx.cache["precision_recall"] = precision_recall(real, ctx.fake_features_and_logits[0])
    return ctx.cache["precision_recall"]


@register_metric(
    "precision",
    reference="fmnist",
    results={
        "precision": f"share of samples on the test split's {K}-NN manifold (higher is better)"
    },
)
def precision(ctx: EvalContext) -> dict[str, float]:
    return {"precision": _cached(ctx)[0]}


@register_metric(
    "recall",
    reference="fmnist",
    results={"recall": f"share of test images on the samples' {K}-NN manifold (higher is better)"},
)
def recall(ctx: EvalContext) -> dict[str, float]:
    return {"recall": _cached(ctx)[1]}
