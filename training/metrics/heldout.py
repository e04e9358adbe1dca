"""A quality report for a model of the user's own images, with no downloaded network.

Training on an image folder keeps a held-out share of its images (``data.held_out``); ``aegan
eval`` compares the model with those images (or with a folder given as ``--data DIR``):

- ``reconstruction`` (training/metrics/reconstruction.py) measures G(E(x)) on them: ``recon_psnr``
  and ``recon_mse``, beside ``pca_recon_psnr`` and ``pca_recon_mse`` of a PCA of the latent's size
  fitted on the training split (when the training images are at hand);
- ``heldout_images`` measures samples against them in a feature space fitted on the user's own
  data: the leading principal components of the held-out images (at most ``PCA_DIMS``, and at most
  a quarter of the held-out count, so the covariances stay estimable). In that space, the
  Fréchet distance of Gaussians fitted to samples and images, and k-NN precision and recall
  (k = 3), on as many samples as there are held-out images.

:data:`CAVEATS` says what each number can and cannot tell; ``aegan eval`` prints it with them.
"""

from __future__ import annotations

import numpy as np

from training.metrics.gaussian import frechet_distance, mean_cov
from training.metrics.latents import PCA, fit_pca
from training.metrics.precision_recall import K, precision_recall
from training.metrics.reconstruction import image_errors
from training.metrics.registry import EvalContext, Reference, register_metric

PCA_DIMS = 32  # most components of the held-out images' feature space
MIN_HELD_OUT = 8  # fewest held-out images the sample-quality figures are computed from

CAVEATS = {
    "recon_psnr": "held-out reconstruction: how closely the encoder and generator reproduce "
    "images of this kind that training never saw; it says nothing about the samples, and a "
    "blurry reconstruction can score well (compare pca_recon_psnr: a PCA of the same size)",
    "heldout_fd_pca": "sample quality in the PCA space of the held-out images: whether samples "
    "have the pixel statistics (brightness, colour, layout, coarse shapes) of the images; it "
    "cannot tell whether a sample looks right to a person, nor fine detail a PCA does not keep; "
    "noisy and biased upwards with few held-out images; compare only between models measured "
    "on the same held-out images (--compare)",
    "heldout_precision": "precision and recall in that space: the share of samples near some "
    "held-out image (realism) and of held-out images near some sample (variety); with few "
    "images both are coarse, and they inherit the PCA's blind spots",
}


def _pca_space(reference: Reference) -> tuple[PCA, int]:
    """The PCA of the held-out images (cached on the reference) and its size."""
    n, pixels = len(reference.samples), int(np.prod(reference.samples.shape[1:]))
    size = min(PCA_DIMS, max(1, n // 4), pixels)
    key = ("heldout_pca", size)
    if key not in reference.cache:
        reference.cache[key] = fit_pca(reference.samples, size)
    return reference.cache[key], size


def pca_reconstruction(reference: Reference, size: int, n: int) -> dict[str, float]:
    """``pca_recon_*`` of the first ``n`` held-out images (:meth:`Reference.subset`) by a
    PCA-``size`` of the training split; cached on the reference."""
    key = ("pca_recon", size, n)
    if key not in reference.cache:
        assert reference.training_split is not None
        train, _ = reference.training_split()
        if len(train) < size:
            reference.cache[key] = {}
        else:
            pca = fit_pca(train, size)
            images = reference.subset(n)
            rec = pca.decode(pca.codes(images), images.shape[1:])
            reference.cache[key] = image_errors(images, rec, prefix="pca_")
    return dict(reference.cache[key])


@register_metric(
    "heldout_images",
    reference="images",
    results={
        "heldout_fd_pca": "Fréchet distance of samples to the held-out images in the PCA space "
        "of the held-out images (lower is better; same held-out set only)",
        "heldout_precision": "share of samples inside the held-out images' 3-NN manifold in "
        "that PCA space (realism)",
        "heldout_recall": "share of held-out images inside the samples' 3-NN manifold (variety)",
        "heldout_images": "held-out images compared with (and samples drawn for the comparison)",
        "heldout_pca_dims": "components of the held-out images' PCA space",
    },
)
def heldout_images(ctx: EvalContext) -> dict[str, float]:
    reference = ctx.reference
    assert reference is not None
    n = len(reference.samples)
    if n < MIN_HELD_OUT:
        ctx.notes.append(
            f"heldout_images: only {n} held-out image(s), {MIN_HELD_OUT} needed for the "
            "sample-quality figures (raise data.held_out, or pass --data DIR)"
        )
        return {}
    pca, size = _pca_space(reference)
    fakes = ctx.fakes[:n]
    if len(fakes) < n:
        ctx.notes.append(f"heldout_images: {len(fakes)} samples against {n} held-out images")
    real_codes, fake_codes = pca.codes(reference.samples), pca.codes(fakes)
    results: dict[str, float] = {
        "heldout_fd_pca": frechet_distance(*mean_cov(fake_codes), *mean_cov(real_codes)),
        "heldout_images": n,
        "heldout_pca_dims": size,
    }
    if min(len(real_codes), len(fake_codes)) > K:
        precision, recall = precision_recall(real_codes, fake_codes)
        results.update(heldout_precision=precision, heldout_recall=recall)
    return results
