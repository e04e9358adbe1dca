"""Mode coverage on vector data whose modes are known (a mixture of Gaussians).

The definitions of VEEGAN (Srivastava et al. 2017) and PacGAN (Lin et al. 2018):

- each generated sample is assigned to the mode whose centre is nearest;
- it is **high quality** when that distance is at most ``hq_radius`` mode std (3 in 2-D);
- a mode is **captured** when at least ``min_count`` high-quality samples are assigned to it (1 in
  both papers, whose figures are on 2 500 samples);
- the **reverse KL** is ``KL(q || p) = sum_k q_k ln(q_k / p_k)`` from the histogram ``q`` of the
  high-quality samples over the modes to the true mode weights ``p`` (PacGAN's third metric): 0 for
  a perfectly balanced model, ``ln K`` when every high-quality sample lies at one of K equal modes.

For an AEGAN the same three numbers of its reconstructions G(E(x)) of held-out data
(``recon_modes_*``) say where a shortfall comes from: reconstructions that cover the modes while
samples G(z) do not mean that the prior's mass falls where the encoder put no code, not that the
decoder cannot reach the modes. The codes are E's outputs as they are: with a stochastic encoder
(``loss.encoder_noise``) the centres of its draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.metrics.registry import EvalContext, register_metric
from training.mixtures import Mixture

_CHUNK = 1024


@dataclass
class ModeCoverage:
    captured: int  # modes with at least min_count high-quality samples
    high_quality: float  # share of all samples within hq_radius std of their nearest centre
    reverse_kl: float  # KL(q || p) in nats; NaN when no sample is of high quality
    histogram: list[int]  # high-quality samples per mode


def nearest_modes(samples: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centre (N,), Euclidean distance to it (N,)) for samples (N, D)."""
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    c = np.asarray(centres, dtype=np.float64)
    index = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float64)
    for i in range(0, len(x), _CHUNK):
        d2 = ((x[i : i + _CHUNK, None, :] - c[None]) ** 2).sum(-1)  # (chunk, K)
        index[i : i + _CHUNK] = d2.argmin(1)
        dist[i : i + _CHUNK] = np.sqrt(d2.min(1))
    return index, dist


def reverse_kl(counts: np.ndarray, weights: np.ndarray) -> float:
    """KL(q || p) of the histogram ``counts`` (normalised to q) from the weights p."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() == 0:
        return float("nan")
    q = counts / counts.sum()
    seen = q > 0
    return float(np.sum(q[seen] * np.log(q[seen] / np.asarray(weights, np.float64)[seen])))


def mode_coverage(samples: np.ndarray, modes: Mixture, min_count: int = 1) -> ModeCoverage:
    if len(samples) == 0:
        raise ValueError("mode coverage needs at least one sample")
    if np.asarray(samples).reshape(len(samples), -1).shape[1] != modes.dim:
        raise ValueError(f"samples of {np.asarray(samples).shape[1:]} for modes in {modes.dim}-D")
    index, dist = nearest_modes(samples, modes.centres)
    good = dist <= modes.hq_radius * modes.std
    counts = np.bincount(index[good], minlength=modes.num_modes)
    return ModeCoverage(
        captured=int(np.sum(counts >= min_count)),
        high_quality=float(good.mean()),
        reverse_kl=reverse_kl(counts, modes.weights),
        histogram=counts.tolist(),
    )


@register_metric(
    "modes",
    reference="vector",
    needs_modes=True,
    results={
        "modes_captured": "modes with at least one high-quality sample (VEEGAN, PacGAN)",
        "modes_high_quality": "share of samples within the high-quality radius of the nearest mode"
        " (3 std in 2-D)",
        "modes_reverse_kl": "KL (nats) of the high-quality samples' mode histogram from the true"
        " mode weights (0 best)",
    },
)
def modes(ctx: EvalContext) -> dict[str, float]:
    assert ctx.reference is not None  # the registry runs it only with its reference
    declared = ctx.reference.modes
    result = mode_coverage(ctx.fakes, declared)
    ctx.details["modes"] = {
        "mixture": declared.name,
        "total": declared.num_modes,
        "hq_radius_std": round(declared.hq_radius, 4),
        "std": declared.std,
        "histogram": result.histogram,
    }
    if result.high_quality == 0:
        ctx.notes.append("modes: no sample is of high quality, the reverse KL is undefined (NaN)")
    return {
        "modes_captured": result.captured,
        "modes_high_quality": result.high_quality,
        "modes_reverse_kl": result.reverse_kl,
    }


@register_metric(
    "recon_modes",
    reference="vector",
    needs_encoder=True,
    needs_modes=True,
    results={
        "recon_modes_captured": "modes_captured of the reconstructions G(E(x)) of held-out data",
        "recon_modes_high_quality": "modes_high_quality of the reconstructions",
        "recon_modes_reverse_kl": "modes_reverse_kl of the reconstructions (compare"
        " modes_reverse_kl)",
    },
)
def recon_modes(ctx: EvalContext) -> dict[str, float]:
    assert ctx.reference is not None
    result = mode_coverage(ctx.reconstructions, ctx.reference.modes)
    ctx.details["recon_modes"] = {"histogram": result.histogram}
    return {
        "recon_modes_captured": result.captured,
        "recon_modes_high_quality": result.high_quality,
        "recon_modes_reverse_kl": result.reverse_kl,
    }
