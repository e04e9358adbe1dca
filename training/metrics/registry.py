"""The metric registry and what every metric is computed from.

A metric is a function ``fn(ctx: EvalContext) -> {result key: value}`` registered under a name with
:func:`register_metric`. The CLI checks the names it is given with :func:`check_metric_names` before
any sampling or training starts, so a typo fails in milliseconds, not after hours.

:class:`EvalContext` holds one model (as numpy callables, so torch networks and ONNX sessions look
the same), one draw of latent samples and one reference set, and computes the shared expensive parts
(generated samples, classifier features) once, lazily, for all metrics of a run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from aegan_core.errors import UserError
from training.metrics.gaussian import mean_cov

# --- the model under evaluation -------------------------------------------------------------


@dataclass
class GenerativeModel:
    """A generator (and encoder, for AEGAN) as numpy functions on float32 batches."""

    generate: Callable[[np.ndarray], np.ndarray]  # z (B, L) -> x (B, *data_shape)
    encode: Callable[[np.ndarray], np.ndarray] | None  # x (B, *data_shape) -> z (B, L); None: GAN
    latent_dim: int
    data_shape: tuple[int, ...]


def batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


# --- reference data -------------------------------------------------------------------------


FMNIST_SHAPE = (1, 28, 28)
REFERENCE_KINDS = ("fmnist", "images", "vector")


class Reference:
    """Held-out real data the samples are compared with.

    ``kind`` is ``"fmnist"`` (the Fashion-MNIST test split, images in [-1, 1]; classifier features
    are computed once and cached here), ``"images"`` (held-out images of the user's own data, in
    [-1, 1]) or ``"vector"`` (an N x D array). ``modes``: the modes the vector data declares (a
    :class:`training.mixtures.Mixture`), or None. ``labels``: class labels of the samples, where
    the data has them. ``training_split``: a function returning the training images and labels
    the held-out ones are compared with (k-NN, probes, PCA baselines), or None. ``cache`` keeps
    what depends on the data alone (a PCA and its scores) for every model measured against it.
    """

    def __init__(
        self,
        kind: str,
        samples: np.ndarray,
        source: str,
        seed: int = 0,
        modes: Any = None,
        labels: np.ndarray | None = None,
        training_split: Callable[[], tuple[np.ndarray, np.ndarray | None]] | None = None,
    ) -> None:
        if kind not in REFERENCE_KINDS:
            raise ValueError(f"reference kind must be one of {REFERENCE_KINDS}, not {kind!r}")
        self.kind = kind
        self.samples = np.ascontiguousarray(samples, dtype=np.float32)
        self.source = source
        self.modes = modes
        self.labels = None if labels is None else np.asarray(labels)
        self.training_split = training_split
        self.cache: dict[Any, Any] = {}
        # A fixed order, so "the first n reference samples" is the same subset in every evaluation.
        self.order = np.random.default_rng(seed).permutation(len(self.samples))

    def subset(self, n: int) -> np.ndarray:
        return self.samples[self.subset_indices(n)]

    def subset_indices(self, n: int) -> np.ndarray:
        """Indices into ``samples`` of :meth:`subset` (to look up cached per-sample values)."""
        return self.order[: min(n, len(self.samples))]

    @cached_property
    def features_and_logits(self) -> tuple[np.ndarray, np.ndarray]:
        from training.metrics.classifier import features_and_logits, load_classifier

        return features_and_logits(load_classifier(), self.samples)

    @cached_property
    def feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of the classifier features of the whole reference set."""
        return mean_cov(self.features_and_logits[0])


# --- the context every metric reads ---------------------------------------------------------


class EvalContext:
    """One evaluation: ``num_samples`` generated from a seeded N(0, I) draw, against a reference."""

    def __init__(
        self,
        model: GenerativeModel,
        reference: Reference | None,
        num_samples: int = 10_000,
        seed: int = 0,
        batch_size: int = 500,
    ) -> None:
        self.model = model
        self.reference = reference
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.notes: list[str] = []
        self.details: dict[str, Any] = {}  # non-scalar results (histograms), kept out of tables
        self.cache: dict[str, Any] = {}  # results shared by metrics (precision and recall)

    @cached_property
    def z(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.standard_normal((self.num_samples, self.model.latent_dim), dtype=np.float32)

    @cached_property
    def fakes(self) -> np.ndarray:
        """G(z), (N, *data_shape) float32."""
        return batched(self.model.generate, self.z, self.batch_size)

    @cached_property
    def fake_features_and_logits(self) -> tuple[np.ndarray, np.ndarray]:
        from training.metrics.classifier import features_and_logits, load_classifier

        return features_and_logits(load_classifier(), self.fakes)

    @cached_property
    def reconstructions(self) -> np.ndarray:
        """G(E(x)) of :meth:`reference_subset` (an AEGAN's, with a reference)."""
        model = self.model
        assert model.encode is not None and self.reference is not None
        encode, generate = model.encode, model.generate
        return batched(lambda b: generate(encode(b)), self.reference_subset(), self.batch_size)

    def reference_subset(self) -> np.ndarray:
        """As many reference samples as generated ones (or all, if fewer): a fixed subset."""
        assert self.reference is not None
        return self.reference.subset(self.num_samples)


# --- the registry ---------------------------------------------------------------------------


MetricFn = Callable[[EvalContext], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    reference: str | None  # reference kind it needs ('fmnist', 'vector') or None
    needs_encoder: bool
    results: dict[str, str] = field(default_factory=dict)  # result key -> meaning (for tables)
    needs_modes: bool = False  # the reference must declare its modes (mixtures of Gaussians)


METRICS: dict[str, Metric] = {}
# Order of the default report: sample quality first, then coverage, then the autoencoder.
REPORT_ORDER = (
    "fd_fmnist",
    "precision",
    "recall",
    "coverage",
    "reconstruction",
    "latents",
    "heldout_images",
    "energy_distance",
    "modes",
    "recon_modes",
)


class UnknownMetricError(UserError, ValueError):
    """A metric name is not registered; the message lists the known ones."""

    usage = True


def register_metric(
    name: str,
    *,
    reference: str | None = None,
    needs_encoder: bool = False,
    needs_modes: bool = False,
    results: dict[str, str],
) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn(ctx) -> {key: value}`` as metric ``name``; ``results`` documents each key."""

    def decorate(fn: MetricFn) -> MetricFn:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        METRICS[name] = Metric(name, fn, reference, needs_encoder, dict(results), needs_modes)
        return fn

    return decorate


def check_metric_names(names: Iterable[str]) -> list[str]:
    """The names, deduplicated in order; raises :class:`UnknownMetricError` for any unknown one."""
    wanted = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in wanted if n not in METRICS]
    if unknown:
        raise UnknownMetricError(
            f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(metric_names())}"
        )
    if not wanted:
        raise UnknownMetricError(f"no metric named; known: {', '.join(metric_names())}")
    return wanted


def metric_names() -> list[str]:
    """Every registered metric, in report order."""
    rank = {name: i for i, name in enumerate(REPORT_ORDER)}
    return sorted(METRICS, key=lambda n: rank.get(n, len(rank)))


def default_metric_names(reference_kind: str | None) -> list[str]:
    """Every registered metric that suits this kind of reference data. Those that need an encoder
    are included: for a GAN they are skipped with a note, so the report says why they are absent."""
    return [n for n in metric_names() if METRICS[n].reference in (None, reference_kind)]


def _skip_reason(metric: Metric, reference: Reference | None, has_encoder: bool) -> str | None:
    if metric.needs_encoder and not has_encoder:
        return "the model has no encoder (gan mode)"
    reference_kind = reference.kind if reference is not None else None
    if metric.reference is not None and metric.reference != reference_kind:
        wanted = {
            "fmnist": "Fashion-MNIST (1x28x28) images",
            "images": "held-out images of an image-folder run (or --data DIR)",
            "vector": "vector data",
        }
        return f"needs {wanted[metric.reference]} with a held-out reference set"
    if metric.needs_modes and (reference is None or reference.modes is None):
        return "the data declares no modes (a mixture:NAME source, or FILE.modes.json by FILE.npy)"
    return None


def compute_metrics(ctx: EvalContext, names: Iterable[str]) -> dict[str, float]:
    """Run the named metrics on one context. Metrics that do not apply are skipped with a note in
    ``ctx.notes``; per-metric seconds go to ``ctx.details['seconds']``."""
    results: dict[str, float] = {}
    seconds: dict[str, float] = ctx.details.setdefault("seconds", {})
    for name in check_metric_names(names):
        metric = METRICS[name]
        reason = _skip_reason(metric, ctx.reference, ctx.model.encode is not None)
        if reason is not None:
            ctx.notes.append(f"{name} skipped: {reason}")
            continue
        start = time.perf_counter()
        results.update(metric.fn(ctx))
        seconds[name] = round(time.perf_counter() - start, 3)
    return results


def result_meanings() -> dict[str, str]:
    """Result key -> meaning, over all registered metrics."""
    return {k: v for m in METRICS.values() for k, v in m.results.items()}
