"""Latent maths: seeded prior samples, truncation, interpolation paths and checks on given latents.

Seeds drive numpy's PCG64 generator, so a seed gives the same latents on every machine and in every
worker; the first ``k`` latents of a seed do not depend on how many are asked for.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from .errors import RequestError

MAX_SEED = 2**32 - 1
LATENT_ABS_MAX = 100.0  # accepted magnitude of a latent coordinate (the prior is N(0, I))
PRIORS = ("normal", "uniform")


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def prior_name(latent_prior: object) -> str:
    """The prior's family from a manifest's ``latent_prior``: a name such as ``"normal(0, I)"`` or
    ``"uniform(-1, 1)"``, or an object ``{"type": name, ...}``."""
    name = latent_prior.get("type") if isinstance(latent_prior, dict) else latent_prior
    text = str(name).strip().lower()
    if text.startswith(("normal", "gaussian", "n(")):
        return "normal"
    if text.startswith("uniform"):
        return "uniform"
    raise ValueError(f"unknown latent prior {latent_prior!r}; expected one of {PRIORS}")


def sample_prior(
    n: int, latent_dim: int, seed: int, truncation: float = 1.0, prior: str = "normal"
) -> np.ndarray:
    """``n`` latents (n, latent_dim) float32 drawn from the prior with ``seed``.

    ``truncation`` (psi in [0, 1]) is the truncation trick: latents are pulled towards the prior's
    mean (zero), ``z * psi``. 1 leaves them as drawn; smaller values trade variety for fidelity.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    if prior == "uniform":
        z = rng.uniform(-1.0, 1.0, size=(n, latent_dim))
    else:
        z = rng.standard_normal(size=(n, latent_dim))
    return (z * truncation).astype(np.float32)


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Straight line from ``a`` to ``b`` at fractions ``t`` (T,) -> (T, D)."""
    t = t[:, None]
    return np.asarray((1.0 - t) * a[None] + t * b[None])


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical path from ``a`` to ``b`` at fractions ``t`` (T,) -> (T, D).

    The direction turns along the great circle at constant angular speed and the norm changes
    linearly, so the path stays in the Gaussian shell where the generator was trained instead of
    cutting through the low-density centre. Falls back to :func:`lerp` for a zero vector, and for
    (anti)parallel vectors, where the great circle is not defined.
    """
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a == 0.0 or norm_b == 0.0:
        return lerp(a, b, t)
    unit_a, unit_b = a / norm_a, b / norm_b
    omega = float(np.arccos(np.clip(np.dot(unit_a, unit_b), -1.0, 1.0)))
    if np.sin(omega) < 1e-6:
        return lerp(a, b, t)
    t = t[:, None]
    direction = (np.sin((1.0 - t) * omega) * unit_a + np.sin(t * omega) * unit_b) / np.sin(omega)
    return np.asarray(direction * ((1.0 - t) * norm_a + t * norm_b))


def interpolate(start: np.ndarray, end: np.ndarray, steps: int, method: str) -> np.ndarray:
    """``steps`` latents (steps, D) float32 from ``start`` to ``end`` inclusive."""
    t = np.linspace(0.0, 1.0, steps)
    path = slerp(start, end, t) if method == "slerp" else lerp(start, end, t)
    path[0], path[-1] = start, end  # exact end points, whatever the rounding
    return path.astype(np.float32)


def check_latents(values: Sequence[Sequence[float]], latent_dim: int, field: str) -> np.ndarray:
    """Latent vectors from a request -> (N, latent_dim) float32, or a 400 naming the bad one."""
    for i, vector in enumerate(values):
        if len(vector) != latent_dim:
            raise RequestError(
                f"{field}[{i}] has {len(vector)} values; this model's latent_dim is {latent_dim}"
            )
    array = np.asarray(values, dtype=np.float64).reshape(len(values), latent_dim)
    bad = ~np.isfinite(array) | (np.abs(array) > LATENT_ABS_MAX)
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        raise RequestError(
            f"{field}[{i}][{j}] = {float(array[i, j])!r}: latent values must be finite numbers "
            f"within +-{LATENT_ABS_MAX:g}"
        )
    return array.astype(np.float32)
