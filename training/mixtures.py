"""Synthetic mixtures of Gaussians with known modes: the vector data that mode collapse is
measured on.

Each :class:`Mixture` declares its modes (centres, the spread of each mode, the weights and the
radius within which a sample counts as high quality), so the mode-coverage metrics
(``training/metrics/modes.py``) can score any model trained on it. Two ways to use one:

- the built-in data source ``mixture:NAME`` (``aegan train --data mixture:ring8``): training data is
  a seeded draw of :data:`TRAIN_SAMPLES`, and ``aegan eval`` compares with a held-out draw of
  another seed and reports the mode metrics;
- an ``.npy`` file with a sidecar ``FILE.modes.json`` beside it (:func:`save_mixture` writes both;
  any user data with known modes can declare them the same way).

The suite (:data:`SUITE`) follows the mode-collapse literature:

- ``ring8``: 8 modes evenly spaced on a circle of radius 1, mode ``k`` at angle ``2 pi k / 8``
  (``k = 0 .. 7``: 8 distinct angles; ``linspace(0, 2 pi, 8)`` would give 7, its ends coincide),
  std 0.01 per coordinate, as in PacGAN's 2D-ring (Lin et al. 2018).
- ``grid25``: 25 modes at ``(2i - 4, 2j - 4)``, ``i, j = 0 .. 4``, std 0.05, as in PacGAN's
  2D-grid (and VEEGAN's, Srivastava et al. 2017).
- ``embedded10``: 10 modes in 100-D. Each mode is an isotropic 10-D Gaussian (std 0.05) at
  ``2 e_k`` of a 10-D space (pairwise 2.83 apart), embedded in 100-D by a fixed orthonormal map, so
  samples lie on a 10-D subspace of the 100-D space (a smaller cousin of VEEGAN's ten 700-D modes
  embedded in 1200-D, whose means and spread that paper does not state).

High quality: within 3 std of the nearest centre in 2-D (VEEGAN, PacGAN). For modes of ``d``
dimensions the radius is the one that holds the same share of a mode's own samples,
``1 - exp(-4.5)`` (98.9 %), which is exactly 3 std for ``d = 2`` (:func:`hq_radius`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MIXTURE_PREFIX = "mixture:"  # data source names of the built-in mixtures
TRAIN_SAMPLES = 25_000  # samples of a built-in mixture's training draw
TRAIN_SEED = 0  # seed of the training draw
HELD_OUT_SEED = 1  # seed of the held-out draw ``aegan eval`` compares with
HQ_SHARE = 1.0 - math.exp(-4.5)  # a 2-D Gaussian's mass within 3 std


def hq_radius(mode_dim: int) -> float:
    """Radius in std within which an isotropic ``mode_dim``-D Gaussian holds :data:`HQ_SHARE` of
    its mass: sqrt of the chi-square quantile, found by bisection (3.0 for 2-D)."""
    if mode_dim < 1:
        raise ValueError(f"mode_dim must be at least 1, not {mode_dim}")
    a = torch.tensor(mode_dim / 2.0, dtype=torch.float64)

    def mass(r: float) -> float:  # P(chi_d <= r) = P(a, r^2 / 2), the regularised gamma
        return float(torch.special.gammainc(a, torch.tensor(r * r / 2.0, dtype=torch.float64)))

    lo, hi = 0.0, 1.0
    while mass(hi) < HQ_SHARE:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if mass(mid) < HQ_SHARE else (lo, mid)
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class Mixture:
    """A mixture of isotropic Gaussians with equal spread, and what counts as one of its modes."""

    name: str
    centres: np.ndarray  # (K, D) mode centres
    std: float  # std of each mode along each of its own dimensions
    weights: np.ndarray  # (K,) mode probabilities, summing to 1
    basis: np.ndarray | None = None  # (D, d) orthonormal: modes spread in its span; None: all D
    hq: float | None = None  # high-quality radius in std; None: hq_radius(mode_dim)
    spread_dims: int | None = None  # dims each mode spreads in, without a basis; None: all D

    @property
    def num_modes(self) -> int:
        return len(self.centres)

    @property
    def dim(self) -> int:
        return self.centres.shape[1]

    @property
    def mode_dim(self) -> int:
        """Dimensions each mode spreads in."""
        if self.basis is not None:
            return self.basis.shape[1]
        return self.dim if self.spread_dims is None else self.spread_dims

    @property
    def hq_radius(self) -> float:
        return hq_radius(self.mode_dim) if self.hq is None else self.hq

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples (n, D) float32 and the mode each came from (n,) int64, seeded."""
        if self.basis is None and self.mode_dim != self.dim:
            raise ValueError(f"{self.name}: modes spread in {self.mode_dim} of {self.dim} dims")
        rng = np.random.default_rng(seed)
        modes = rng.choice(self.num_modes, size=n, p=self.weights)
        noise = rng.standard_normal((n, self.mode_dim)) * self.std
        if self.basis is not None:
            noise = noise @ self.basis.T
        return (self.centres[modes] + noise).astype(np.float32), modes.astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """The sidecar ``FILE.modes.json`` content: everything the metrics need."""
        return {
            "name": self.name,
            "centres": self.centres.tolist(),
            "std": self.std,
            "weights": self.weights.tolist(),
            "mode_dim": self.mode_dim,
            "hq_radius": self.hq_radius,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "modes") -> Mixture:
        """Modes declared by a sidecar: ``centres`` (K x D) and ``std`` are required; ``weights``
        default to uniform, ``hq_radius`` to :func:`hq_radius` of ``mode_dim`` (default D)."""
        try:
            centres = np.asarray(raw["centres"], dtype=np.float64)
            std = float(raw["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: needs 'centres' (K x D numbers) and 'std' ({exc})") from exc
        if centres.ndim != 2 or len(centres) < 1 or not np.all(np.isfinite(centres)):
            raise ValueError(f"{where}: 'centres' must be a non-empty K x D array of numbers")
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"{where}: 'std' must be a positive number, not {std}")
        k, d = centres.shape
        weights = np.asarray(raw.get("weights") or np.full(k, 1.0 / k), dtype=np.float64)
        if weights.shape != (k,) or np.any(weights <= 0) or not math.isclose(weights.sum(), 1.0):
            # A mode of weight 0 is not a mode: reverse KL against it would be infinite.
            raise ValueError(f"{where}: 'weights' must be {k} positive numbers summing to 1")
        declared_dim: Any = raw.get("mode_dim", d)
        mode_dim = int(declared_dim)
        if not 1 <= mode_dim <= d:
            raise ValueError(f"{where}: 'mode_dim' must be between 1 and {d}, not {mode_dim}")
        radius = raw.get("hq_radius")
        radius = hq_radius(mode_dim) if radius is None else float(radius)
        if not radius > 0:
            raise ValueError(f"{where}: 'hq_radius' must be positive, not {radius}")
        # Only the declaration is kept (no basis): enough for the metrics, not for sampling.
        return cls(str(raw.get("name", where)), centres, std, weights, None, radius, mode_dim)


# --- the suite ------------------------------------------------------------------------------


def ring(num_modes: int = 8, radius: float = 1.0, std: float = 0.01) -> Mixture:
    angles = 2.0 * np.pi * np.arange(num_modes) / num_modes  # k = 0 .. K-1: K distinct angles
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return Mixture(f"ring{num_modes}", centres, std, np.full(num_modes, 1.0 / num_modes))


def grid(side: int = 5, spacing: float = 2.0, std: float = 0.05) -> Mixture:
    axis = spacing * np.arange(side) - spacing * (side - 1) / 2.0  # -4, -2, 0, 2, 4
    centres = np.array([(a, b) for a in axis for b in axis])
    k = side * side
    return Mixture(f"grid{k}", centres, std, np.full(k, 1.0 / k))


def embedded(
    num_modes: int = 10, dim: int = 100, scale: float = 2.0, std: float = 0.05, seed: int = 0
) -> Mixture:
    """Modes at ``scale * e_k`` of a ``num_modes``-D space, each spreading in all of it, mapped
    into ``dim``-D by a seeded orthonormal basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, num_modes)))  # (dim, num_modes)
    centres = scale * basis.T  # row k = basis @ (scale * e_k)
    return Mixture(f"embedded{num_modes}", centres, std, np.full(num_modes, 1.0 / num_modes), basis)


SUITE: dict[str, Mixture] = {m.name: m for m in (ring(), grid(), embedded())}


def get_mixture(name: str) -> Mixture:
    """A mixture of the suite by name (with or without the ``mixture:`` prefix)."""
    key = name.removeprefix(MIXTURE_PREFIX)
    if key not in SUITE:
        raise KeyError(f"unknown mixture {key!r}; choose from {', '.join(SUITE)}")
    return SUITE[key]


# --- files ----------------------------------------------------------------------------------


def sidecar_path(npy: str | Path) -> Path:
    """``FILE.npy`` -> ``FILE.modes.json``."""
    path = Path(npy)
    return path.with_name(path.name.removesuffix(".npy") + ".modes.json")


def read_sidecar(npy: str | Path) -> Mixture | None:
    """The modes an ``.npy`` file declares beside it, or None when it declares none."""
    path = sidecar_path(npy)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return Mixture.from_dict(raw, str(path))


def save_mixture(mixture: Mixture, path: str | Path, n: int, seed: int) -> Path:
    """Write ``n`` seeded samples to ``path`` (.npy) and the modes to its sidecar."""
    path = Path(path)
    samples, _ = mixture.sample(n, seed)
    np.save(path, samples)
    sidecar_path(path).write_text(json.dumps(mixture.to_dict(), indent=1) + "\n")
    return path
