"""The Fréchet distance between Gaussians fitted to two sets of features (numpy only): the math
behind FD-FMNIST (training/metrics/frechet.py) and the held-out images' FD (heldout.py)."""

from __future__ import annotations

import numpy as np


def mean_cov(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigen-decomposition)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

    ``tr((S1 S2)^(1/2))`` is computed as ``tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)``: the two
    matrices share eigenvalues, and the second is symmetric, so a symmetric eigensolver in float64
    is exact and stable (no complex parts to discard, unlike a general ``sqrtm``).
    """
    a = _sqrt_psd(cov1)
    eig = np.linalg.eigvalsh(a @ cov2 @ a)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)
    return max(fd, 0.0)  # rounding can leave -1e-12 for identical sets
