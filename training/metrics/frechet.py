"""FD-FMNIST: the Fréchet distance between Gaussians fitted to classifier features.

The same formula as FID, ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, but measured in the
penultimate features of the project's own Fashion-MNIST classifier, not Inception's. The numbers are
therefore not comparable with published FIDs and are never called FID.
"""

from __future__ import annotations

from training.metrics.gaussian import frechet_distance, mean_cov
from training.metrics.registry import EvalContext, register_metric

__all__ = ["fd_fmnist", "frechet_distance", "mean_cov"]


@register_metric(
    "fd_fmnist",
    reference="fmnist",
    results={
        "fd_fmnist": "Fréchet distance in classifier features to the test split (lower is better)"
    },
)
def fd_fmnist(ctx: EvalContext) -> dict[str, float]:
    assert ctx.reference is not None
    mu_real, cov_real = ctx.reference.feature_stats
    mu_fake, cov_fake = mean_cov(ctx.fake_features_and_logits[0])
    return {"fd_fmnist": frechet_distance(mu_fake, cov_fake, mu_real, cov_real)}
