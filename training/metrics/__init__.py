"""Sample-quality metrics, measured without internet access.

Importing this package registers every metric family (one module each) with the registry.
"""

from training.metrics import (
    coverage,
    frechet,
    heldout,
    latents,
    modes,
    precision_recall,
    reconstruction,
    vectors,
)
from training.metrics.registry import (
    METRICS,
    EvalContext,
    GenerativeModel,
    Reference,
    UnknownMetricError,
    check_metric_names,
    compute_metrics,
    default_metric_names,
    metric_names,
    register_metric,
    result_meanings,
)

__all__ = [
    "METRICS",
    "EvalContext",
    "GenerativeModel",
    "Reference",
    "UnknownMetricError",
    "check_metric_names",
    "compute_metrics",
    "coverage",
    "default_metric_names",
    "frechet",
    "heldout",
    "latents",
    "metric_names",
    "modes",
    "precision_recall",
    "reconstruction",
    "register_metric",
    "result_meanings",
    "vectors",
]
