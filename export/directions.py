"""Latent directions of a bundle: principal components of its encoder's latents of the training
data.

GANSpace (Härkönen, Hertzmann, Lehtinen and Paris, "GANSpace: Discovering Interpretable GAN
Controls", NeurIPS 2020) finds meaningful edit directions as the principal components of a GAN's
intermediate activations over random samples, then maps them back to the latent space. An AEGAN has
an encoder, which gives the latents of real images directly: the principal components of E(x) over
the training data are directions along which the data varies most, in z itself. The latent explorer
(``/ui``) moves a latent along them.

One implementation for both paths: ``aegan export`` calls :func:`add_directions` on the bundle it
is writing, and ``aegan directions BUNDLE`` on an existing bundle (keeping the rest of its
manifest). Both run the bundle's own ONNX encoder (fp32, CPU), so the directions match what the
service serves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aegan_core.bundle import (
    DIRECTIONS_KEY,
    ENCODER,
    Bundle,
    BundleError,
    LatentDirections,
    load_bundle,
    write_directions,
    write_manifest,
)
from aegan_core.runtime import CPU, open_session

if TYPE_CHECKING:
    from training.config import DataConfig

log = logging.getLogger(__name__)

MAX_DIRECTIONS = 64  # most components stored (all of them for latents of up to 64 dimensions)
STABILITY_COMPONENTS = 8  # leading components whose split-half agreement the manifest records
ENCODE_BATCH = 500  # training samples per encoder run


def pca(
    latents: np.ndarray, count: int = MAX_DIRECTIONS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, components (k, d), variances (k,), total variance) of ``latents`` (N, d), N >= 2.

    Components are unit eigenvectors of the covariance by decreasing eigenvalue, k = min(count, d),
    each signed so that its largest coordinate is positive (the result does not depend on the
    solver's sign choice)."""
    z = np.asarray(latents, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"PCA needs at least 2 latents as an (N, d) array; got shape {z.shape}")
    mean = z.mean(axis=0)
    covariance = np.cov(z - mean, rowvar=False).reshape(z.shape[1], z.shape[1])
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(eigenvalues)[::-1][: min(count, z.shape[1])]
    components = eigenvectors[:, order].T
    signs = np.sign(components[np.arange(len(order)), np.abs(components).argmax(axis=1)])
    components *= signs[:, None]
    variances = np.clip(eigenvalues[order], 0.0, None)
    return mean, components, variances, float(np.clip(eigenvalues, 0.0, None).sum())


def split_half_cosine(latents: np.ndarray, count: int = STABILITY_COMPONENTS) -> list[float]:
    """|cos| between each leading component computed on the even and on the odd latents: near 1
    when the data determines the direction, low when neighbouring variances are too close to tell
    the components apart (a nearly flat spectrum)."""
    if len(latents) < 4:
        return []
    _, even, _, _ = pca(latents[0::2], count)
    _, odd, _, _ = pca(latents[1::2], count)
    return [round(float(c), 3) for c in np.abs((even * odd).sum(axis=1))]


def encode(bundle: Bundle, samples: np.ndarray, threads: int = 0) -> np.ndarray:
    """The bundle's fp32 ONNX encoder over ``samples`` (model inputs), in batches, on the CPU."""
    session = open_session(str(bundle.file(ENCODER)), [CPU], threads, quiet=True)
    input_name, _ = bundle.tensor_names(ENCODER)
    parts = [
        session.run(None, {input_name: np.ascontiguousarray(samples[i : i + ENCODE_BATCH])})[0]
        for i in range(0, len(samples), ENCODE_BATCH)
    ]
    return np.concatenate(parts).astype(np.float64)


def add_directions(
    bundle_dir: Path, samples: np.ndarray, data: str, count: int = MAX_DIRECTIONS
) -> Bundle:
    """Encode ``samples`` (training data as model inputs, float32, in [-1, 1] for images) with the
    bundle's encoder, store the principal directions of the latents in ``directions.json``, record
    it (with its SHA-256) in the manifest, and return the bundle as re-read and verified.

    The rest of the manifest is kept as it is; existing directions are replaced.
    """
    bundle = load_bundle(bundle_dir)
    samples = np.asarray(samples, dtype=np.float32)
    if samples.shape[1:] != bundle.data_shape:
        raise BundleError(
            f"training data {data!r} has samples of shape {list(samples.shape[1:])}; "
            f"the bundle's model takes {list(bundle.data_shape)}"
        )
    latents = encode(bundle, samples)
    mean, components, variances, total = pca(latents, count)
    directions = LatentDirections(
        method="pca",
        mean=mean,
        components=components,
        variances=variances,
        total_variance=total,
        samples=len(samples),
        data=data,
    )
    manifest = dict(bundle.manifest)
    entry = write_directions(Path(bundle_dir), directions)
    entry["split_half_cosine"] = split_half_cosine(latents)
    manifest[DIRECTIONS_KEY] = entry
    write_manifest(Path(bundle_dir), manifest)
    share = variances[: min(3, len(variances))].sum() / max(total, 1e-30)
    log.info(
        "latent directions of %s: PCA of %d latents of %s; the first %d explain %.0f %% of the "
        "variance",
        bundle_dir,
        len(samples),
        data,
        min(3, len(variances)),
        100 * share,
    )
    return load_bundle(bundle_dir)


def training_samples(data: DataConfig) -> tuple[np.ndarray, str]:
    """(samples as model inputs, a description) of the training data a config names (its
    ``limit`` applies). Raises :class:`training.data.DataError` when it cannot be read."""
    from training.data import load_dataset  # torch: only the export stage needs it

    dataset = load_dataset(data)
    described = dataset.source if data.limit is None else f"{dataset.source}[:{data.limit}]"
    return dataset.samples.numpy(), described


def bundle_data_config(bundle: Bundle) -> DataConfig:
    """The training data config recorded in the bundle's manifest (``training_config.data``)."""
    from training.config import DataConfig, RunConfig

    raw = bundle.manifest.get("training_config")
    try:
        return RunConfig.from_dict(raw).data if isinstance(raw, dict) else DataConfig()
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{bundle.path}: the manifest's training_config cannot be read ({exc}); name the "
            "training data with --data"
        ) from exc
