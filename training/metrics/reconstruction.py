"""Reconstruction through the autoencoder: images G(E(x)) on held-out data, latents E(G(z)).

Image errors are measured on pixels scaled to [0, 1]: ``recon_mse`` is the mean squared error over
all pixels and ``recon_psnr`` the mean over images of ``10 log10(1 / MSE_i)`` dB. For vector data
``recon_mse`` is in the data's own units and no PSNR is given. ``latent_mse`` is the mean over
samples and dimensions of ``(E(G(z)) - z)^2`` for z ~ N(0, I), the quantity the training loss
``recon_z`` pulls down.

Held-out images of an image-folder run are measured like the test split, beside
``pca_recon_psnr`` / ``pca_recon_mse`` of a PCA of the latent's size fitted on the training split
(training/metrics/heldout.py).

For Fashion-MNIST, ``recon_class_agreement`` is the share of test images whose reconstruction gets
the classifier's class of the image itself (no labels needed: it asks whether G(E(x)) keeps what
x *is*, where PSNR only asks how close the pixels are), and ``recon_class_kl`` is the KL divergence
from uniform of the classes of the reconstructions, the number ``coverage_kl`` gives for samples.
Set beside ``coverage_kl``, it separates the two places a class imbalance of samples can come from:
the decoder (reconstructions skewed too) or the way the prior's mass is spread over the latent
space (reconstructions balanced, samples not).
"""

from __future__ import annotations

import numpy as np

from aegan_core.images import per_sample_mse, psnr, to_unit
from training.metrics.registry import EvalContext, batched, register_metric


def image_errors(x: np.ndarray, x_rec: np.ndarray, prefix: str = "") -> dict[str, float]:
    """``{prefix}recon_mse`` and ``{prefix}recon_psnr`` of images in [-1, 1], measured in [0, 1]:
    the MSE over all pixels and the mean per-image PSNR."""
    x, x_rec = to_unit(x), to_unit(x_rec)
    return {
        f"{prefix}recon_mse": float(per_sample_mse(x, x_rec).mean()),
        f"{prefix}recon_psnr": float(psnr(x, x_rec).mean()),
    }


@register_metric(
    "reconstruction",
    needs_encoder=True,
    results={
        "recon_mse": "MSE of G(E(x)) on held-out data (images: pixels in [0, 1]; lower is better)",
        "recon_psnr": "mean PSNR of G(E(x)) on held-out images, dB (higher is better)",
        "latent_mse": "mean squared error of E(G(z)) against z per dimension (lower is better)",
        "recon_class_agreement": "share of test images whose G(E(x)) keeps the class of x",
        "recon_class_kl": "KL of the classes of G(E(x)) from uniform, nats (compare coverage_kl)",
    },
)
def reconstruction(ctx: EvalContext) -> dict[str, float]:
    model = ctx.model
    assert model.encode is not None
    z_rec = batched(model.encode, ctx.fakes, ctx.batch_size)
    results = {"latent_mse": float(np.mean((z_rec - ctx.z) ** 2))}
    if ctx.reference is None:
        ctx.notes.append("reconstruction: no held-out data, image/vector errors skipped")
        return results
    x, x_rec = ctx.reference_subset(), ctx.reconstructions
    if ctx.reference.kind in ("fmnist", "images"):
        results.update(image_errors(x, x_rec))
    if ctx.reference.kind == "fmnist":
        results.update(_class_agreement(ctx, x_rec))
    elif ctx.reference.kind == "images" and ctx.reference.training_split is not None:
        from training.metrics.heldout import pca_reconstruction

        results.update(pca_reconstruction(ctx.reference, model.latent_dim, len(x)))
    if ctx.reference.kind == "vector":
        results["recon_mse"] = float(per_sample_mse(x, x_rec).mean())
    return results


def _class_agreement(ctx: EvalContext, x_rec: np.ndarray) -> dict[str, float]:
    from training.metrics.classifier import features_and_logits, load_classifier
    from training.metrics.coverage import class_histogram, kl_to_uniform, named_shares

    assert ctx.reference is not None
    n = len(x_rec)
    of_images = ctx.reference.features_and_logits[1][ctx.reference.subset_indices(n)].argmax(1)
    of_reconstructions = features_and_logits(load_classifier(), x_rec)[1].argmax(1)
    shares = class_histogram(of_reconstructions)
    ctx.details["recon_class_shares"] = named_shares(shares)
    return {
        "recon_class_agreement": float(np.mean(of_images == of_reconstructions)),
        "recon_class_kl": kl_to_uniform(shares),
    }
