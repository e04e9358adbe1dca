"""What the encoder's latents are worth, beside a PCA of the same size.

The yardstick of an encoder is the simplest representation of the same size: a PCA of the
training pixels with as many components as the latent has dimensions. Each measure below is given
for the encoder's latents and for that PCA, on the same test images against the same training
images (pixels in [0, 1]):

- ``knn_euclidean``, ``knn_cosine``: k-NN accuracy (k = 10) of each test image's representation
  against the training images' representations, by Euclidean distance and by cosine similarity
  (majority vote of the 10 nearest training labels; a tie goes to the smallest label, as in
  scikit-learn's ``KNeighborsClassifier``).
- ``probe``: accuracy of a linear probe, ridge regression onto one-hot labels in closed form
  (features centred on the training mean, ridge ``RIDGE`` times the mean feature variance), the
  predicted class the largest output.
- ``pca_recon_psnr``, ``pca_recon_mse``: the PCA's reconstruction of the test images (clipped to
  [0, 1], like the autoencoder's) — the numbers to set beside ``recon_psnr`` and ``recon_mse``.

The PCA and its measures depend only on the data and the size: they are computed once per
reference set, size and test subset and kept on the :class:`Reference` (as its classifier features
are), so a second model of the same latent size costs only its own encodings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.metrics.reconstruction import image_errors
from training.metrics.registry import EvalContext, Reference, batched, register_metric

K_NEIGHBOURS = 10
RIDGE = 1e-3  # ridge of the linear probe, as a fraction of the mean feature variance
CHUNK = 1000  # test rows per block of the k-NN distance matrix


# --- PCA ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PCA:
    """Principal components of flattened images (pixels in [0, 1])."""

    mean: np.ndarray  # (P,) float64
    components: np.ndarray  # (K, P) float64, orthonormal rows, by decreasing variance
    variances: np.ndarray  # (K,) float64

    def codes(self, images: np.ndarray) -> np.ndarray:
        """(N, K) float64 coordinates of images in [-1, 1] (the pipeline's range)."""
        return (_flat_unit(images) - self.mean) @ self.components.T

    def decode(self, codes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Images in [-1, 1] (not clipped) from codes."""
        flat = codes @ self.components + self.mean
        return (flat * 2.0 - 1.0).reshape(len(codes), *shape)


def _flat_unit(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images, dtype=np.float64).reshape(len(images), -1) + 1.0) / 2.0


def fit_pca(images: np.ndarray, size: int, batch_size: int = 10_000) -> PCA:
    """The ``size`` leading principal components of images in [-1, 1], from the covariance of the
    pixels in [0, 1] (accumulated in float64, in batches)."""
    n = len(images)
    if not 1 <= size <= min(n, int(np.prod(images.shape[1:]))):
        raise ValueError(f"PCA size {size} does not fit {n} images of shape {images.shape[1:]}")
    mean = sum(_flat_unit(images[i : i + batch_size]).sum(0) for i in range(0, n, batch_size)) / n
    scatter = 0.0
    for i in range(0, n, batch_size):
        centred = _flat_unit(images[i : i + batch_size]) - mean
        scatter = scatter + centred.T @ centred
    variances, vectors = np.linalg.eigh(scatter / max(n - 1, 1))
    order = np.argsort(variances)[::-1][:size]
    return PCA(mean, np.ascontiguousarray(vectors[:, order].T), variances[order])


# --- the measures ---------------------------------------------------------------------------


def knn_accuracy(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    k: int = K_NEIGHBOURS,
    metric: str = "euclidean",
) -> float:
    """Share of test points whose k nearest training points vote for their label."""
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', not {metric!r}")
    if len(train) < k:
        raise ValueError(f"k-NN with k = {k} needs at least {k} training points")
    a = torch.as_tensor(np.asarray(train, dtype=np.float32))
    if metric == "cosine":
        a = torch.nn.functional.normalize(a, dim=1)
    a_sq = (a * a).sum(1)
    labels = torch.as_tensor(np.asarray(train_labels, dtype=np.int64))
    classes = max(int(labels.max()), int(np.max(test_labels))) + 1
    predicted = []
    for start in range(0, len(test), CHUNK):
        b = torch.as_tensor(np.asarray(test[start : start + CHUNK], dtype=np.float32))
        if metric == "cosine":
            b = torch.nn.functional.normalize(b, dim=1)
            score = -(b @ a.T)  # smaller is nearer
        else:
            score = a_sq[None, :] - 2.0 * (b @ a.T)  # |b|^2 is the same for every candidate
        nearest = score.topk(k, dim=1, largest=False).indices  # (B, k), nearest first
        votes = labels[nearest]  # (B, k)
        counts = torch.zeros(len(b), classes).scatter_add_(1, votes, torch.ones(votes.shape))
        predicted.append(counts.argmax(1))  # a tie goes to the smallest label
    return float((torch.cat(predicted).numpy() == np.asarray(test_labels)).mean())


def probe_accuracy(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    ridge: float = RIDGE,
) -> float:
    """Accuracy of ridge regression onto one-hot labels (closed form, float64)."""
    x = np.asarray(train, dtype=np.float64)
    mean = x.mean(0)
    x = x - mean
    classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    onehot = np.eye(classes)[np.asarray(train_labels)]
    gram = x.T @ x
    lam = ridge * max(float(np.trace(gram)) / gram.shape[0], 1e-12)
    weights = np.linalg.solve(gram + lam * np.eye(len(gram)), x.T @ (onehot - onehot.mean(0)))
    scores = (np.asarray(test, dtype=np.float64) - mean) @ weights
    return float((scores.argmax(1) == np.asarray(test_labels)).mean())


def representation_scores(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray
) -> dict[str, float]:
    """k-NN (Euclidean, cosine) and linear-probe accuracy of one representation."""
    return {
        "knn_euclidean": knn_accuracy(train, train_labels, test, test_labels, metric="euclidean"),
        "knn_cosine": knn_accuracy(train, train_labels, test, test_labels, metric="cosine"),
        "probe": probe_accuracy(train, train_labels, test, test_labels),
    }


def pca_scores(reference: Reference, size: int, n: int) -> dict[str, float]:
    """The PCA-``size`` row for the first ``n`` reference samples, cached on the reference."""
    key = ("pca_scores", size, n)
    assert reference.training_split is not None and reference.labels is not None  # checked above
    if key not in reference.cache:
        train, train_labels = reference.training_split()
        if train_labels is None:
            raise ValueError("the PCA row needs the class labels of the training split")
        pca = reference.cache.get(("pca", size))
        if pca is None:
            pca = reference.cache[("pca", size)] = fit_pca(train, size)
        test = reference.subset(n)
        test_labels = reference.labels[reference.subset_indices(n)]
        train_codes = reference.cache.get(("pca_train_codes", size))
        if train_codes is None:
            train_codes = reference.cache[("pca_train_codes", size)] = pca.codes(train)
        test_codes = pca.codes(test)
        rec = pca.decode(test_codes, test.shape[1:])
        scores = representation_scores(train_codes, train_labels, test_codes, test_labels)
        reference.cache[key] = {
            **{f"pca_{k}": v for k, v in scores.items()},
            **image_errors(test, rec, prefix="pca_"),
        }
    return dict(reference.cache[key])


@register_metric(
    "latents",
    reference="fmnist",
    needs_encoder=True,
    results={
        "latent_knn_euclidean": "10-NN accuracy of E(x) of test images against E(x) of the "
        "training images, Euclidean (higher is better; compare pca_knn_euclidean)",
        "latent_knn_cosine": "10-NN accuracy of E(x), cosine similarity (compare pca_knn_cosine)",
        "latent_probe": "linear-probe (ridge, one-hot) test accuracy on E(x) (compare pca_probe)",
        "pca_knn_euclidean": "10-NN accuracy of a PCA of the latent's size fitted on the "
        "training pixels, Euclidean",
        "pca_knn_cosine": "10-NN accuracy of that PCA, cosine",
        "pca_probe": "linear-probe test accuracy on that PCA's codes",
        "pca_recon_mse": "MSE of a PCA of the latent's size, fitted on the training images, "
        "reconstructing the held-out (test) images (compare recon_mse)",
        "pca_recon_psnr": "mean PSNR of that PCA's reconstruction, dB (compare recon_psnr)",
    },
)
def latents(ctx: EvalContext) -> dict[str, float]:
    model, reference = ctx.model, ctx.reference
    assert model.encode is not None and reference is not None
    if reference.labels is None or reference.training_split is None:
        ctx.notes.append("latents skipped: the reference has no labels or training split")
        return {}
    n = len(reference.subset_indices(ctx.num_samples))
    train, train_labels = reference.training_split()
    if train_labels is None:
        ctx.notes.append("latents skipped: the reference's training split has no labels")
        return {}
    train_latents = batched(model.encode, train, ctx.batch_size)
    test_latents = batched(model.encode, reference.subset(n), ctx.batch_size)
    test_labels = reference.labels[reference.subset_indices(n)]
    scores = representation_scores(train_latents, train_labels, test_latents, test_labels)
    return {
        **{f"latent_{k}": v for k, v in scores.items()},
        **pca_scores(reference, model.latent_dim, n),
    }
