"""Vector data: the energy distance between generated samples and held-out data.

``D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with the Euclidean norm (Székely and Rizzo), estimated
by the V-statistic over all pairs, so it is non-negative and exactly zero for identical sets. It is
zero only when the two distributions are equal, needs no kernel or bandwidth, and is in the data's
units. Compared with as many held-out samples as generated ones.
"""

from __future__ import annotations

import numpy as np
import torch

from training.metrics.registry import EvalContext, register_metric

_CHUNK = 1000


def _mean_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of rows of a and b."""
    total = sum(float(torch.cdist(a[i : i + _CHUNK], b).sum()) for i in range(0, len(a), _CHUNK))
    return total / (len(a) * len(b))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Squared energy distance between samples x (N, D) and y (M, D) (V-statistic)."""
    a = torch.as_tensor(np.asarray(x).reshape(len(x), -1), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(y).reshape(len(y), -1), dtype=torch.float64)
    return max(2.0 * _mean_dist(a, b) - _mean_dist(a, a) - _mean_dist(b, b), 0.0)


@register_metric(
    "energy_distance",
    reference="vector",
    results={"energy_distance": "squared energy distance to held-out data (0 best)"},
)
def energy(ctx: EvalContext) -> dict[str, float]:
    return {"energy_distance": energy_distance(ctx.fakes, ctx.reference_subset())}
