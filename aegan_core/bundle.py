"""The model bundle: a directory holding ``generator.onnx``, ``encoder.onnx`` and ``manifest.json``.

This module and :mod:`aegan_core.manifest` (the :class:`~aegan_core.manifest.Manifest` model) are
the single definition of the bundle format. ``export/`` writes bundles with
:func:`write_manifest`; the service loads them with :func:`load_bundle`, which checks the manifest
against the model, verifies the SHA-256 of every file it names and refuses a bundle that is
incomplete or altered.

Optional addition (its own version, so bundles without it still load): ``directions.json``, the
principal directions of the encoder's latents of the training data (written by
:func:`write_directions`, named by the manifest's ``directions`` entry and hash-checked like the
graphs).

No torch here: the serving image carries none.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .manifest import (
    ENCODER,
    ENCODER_FP16,
    FILE_NAMES,
    FORMAT_VERSION,
    GENERATOR,
    GENERATOR_FP16,
    REQUIRED_ROLES,
    DirectionsEntry,
    GraphEntry,
    Manifest,
    ManifestError,
    parse_manifest,
)

__all__ = [  # the format's names, wherever they are defined
    "ENCODER",
    "ENCODER_FP16",
    "FILE_NAMES",
    "FORMAT_VERSION",
    "GENERATOR",
    "GENERATOR_FP16",
    "REQUIRED_ROLES",
    "Bundle",
    "BundleError",
    "LatentDirections",
    "Manifest",
    "load_bundle",
    "resolve_bundle_dir",
    "write_manifest",
]

# The shipped bundle, found relative to this package (repository root, Bento or container image).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "fashion-mnist"
MANIFEST_NAME = "manifest.json"

# Tensor names of the exported graphs (batch dimension dynamic).
LATENT_TENSOR = "z"  # (B, latent_dim) float32
DATA_TENSOR = "x"  # (B, C, H, W) float32 in [-1, 1] for images; (B, D) float32 for vectors

# Latent directions (optional): the manifest's ``directions`` entry names this file with its hash.
DIRECTIONS_KEY = "directions"
DIRECTIONS_NAME = "directions.json"
DIRECTIONS_VERSION = 1  # version of the directions file and its manifest entry
ORTHONORMAL_TOLERANCE = 1e-3  # largest |C C^T - I| accepted for the stored components


class BundleError(UserError, ValueError):
    """A bundle is missing, incomplete, altered or malformed. The message names the file."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LatentDirections:
    """Principal directions of the encoder's latents E(x) over the training data (PCA).

    ``components`` holds unit, mutually orthogonal rows (k, latent_dim) by decreasing variance;
    ``variances`` the variance of the latents along each; ``total_variance`` the sum over all
    latent_dim directions (so ``variances / total_variance`` is the share each explains).
    """

    method: str  # "pca"
    mean: np.ndarray  # (latent_dim,) mean latent of the training data
    components: np.ndarray  # (k, latent_dim)
    variances: np.ndarray  # (k,)
    total_variance: float
    samples: int  # training samples encoded
    data: str  # what they were, e.g. "fashion-mnist:train"

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": DIRECTIONS_VERSION,
            "method": self.method,
            "samples": self.samples,
            "data": self.data,
            "total_variance": _round(self.total_variance),
            "variances": [_round(v) for v in self.variances.tolist()],
            "mean": [_round(v) for v in self.mean.tolist()],
            "components": [[_round(v) for v in row] for row in self.components.tolist()],
        }


def _round(value: float) -> float:
    """Seven significant digits: float32 precision, half the JSON."""
    return float(f"{value:.7g}")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory, its manifest, the paths of its graphs and, when the
    bundle has them, its latent directions."""

    path: Path
    spec: Manifest  # the checked manifest
    directions: LatentDirections | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as JSON (what ``manifest.json`` holds), for reports and ``/info``."""
        return self.spec.to_json()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        """``"image"`` (data shape C, H, W) or ``"vector"`` (data shape D)."""
        return self.spec.kind

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.spec.data_shape

    @property
    def latent_dim(self) -> int:
        return self.spec.latent_dim

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.spec.metrics or {})

    def has(self, role: str) -> bool:
        return role in self.spec.files

    def sha256(self, role: str) -> str:
        """The SHA-256 the manifest records for the graph with this role."""
        return self.spec.files[role].sha256

    def file(self, role: str) -> Path:
        """Path of the graph with this role (``generator``, ``encoder``, ``generator_fp16``...)."""
        if role not in self.spec.files:
            raise BundleError(f"bundle {self.path} has no {role!r} graph")
        return self.path / self.spec.files[role].path

    def tensor_names(self, role: str) -> tuple[str, str]:
        entry = self.spec.files[role]
        return entry.input, entry.output


def file_entry(bundle_dir: Path, role: str, input_name: str, output_name: str) -> dict[str, Any]:
    """Manifest entry for one graph already written into ``bundle_dir``."""
    name = FILE_NAMES[role]
    path = bundle_dir / name
    return {
        "path": name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "input": input_name,
        "output": output_name,
    }


def write_manifest(bundle_dir: Path, manifest: Manifest | dict[str, Any]) -> Path:
    """Write ``manifest.json`` (a dict is checked against :class:`Manifest` first) and fsync it."""
    if not isinstance(manifest, Manifest):
        try:
            manifest = parse_manifest(manifest)
        except ManifestError as exc:
            raise BundleError(f"manifest {exc}") from None
    path = Path(bundle_dir) / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def write_directions(bundle_dir: Path, directions: LatentDirections) -> dict[str, Any]:
    """Write ``directions.json`` into ``bundle_dir``; return its manifest entry (put it under
    ``manifest["directions"]``, then :func:`write_manifest`)."""
    path = Path(bundle_dir) / DIRECTIONS_NAME
    path.write_text(json.dumps(directions.to_json(), separators=(",", ":")) + "\n", "utf-8")
    return {
        "format_version": DIRECTIONS_VERSION,
        "path": DIRECTIONS_NAME,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "method": directions.method,
        "count": len(directions.variances),
        "samples": directions.samples,
        "data": directions.data,
    }


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read a bundle directory and (by default) verify every file's SHA-256 against its manifest.

    Raises :class:`BundleError` with a message naming the offending file when the directory or a
    file is missing, the manifest is malformed, or a hash does not match.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"model bundle {root} is not a directory")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"model bundle {root} has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object")
    try:
        spec = parse_manifest(manifest)
    except ManifestError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    for role, entry in spec.files.items():
        _checked_file(root, entry, f"{manifest_path}: entry for {role!r}", verify)
    directions = None
    if spec.directions is not None:
        directions = _load_directions(root, spec, verify)
    return Bundle(path=root, spec=spec, directions=directions)


def _checked_file(
    root: Path, entry: GraphEntry | DirectionsEntry, where: str, verify: bool
) -> Path:
    """The file a manifest entry names: a plain file name (a string), a regular file directly in
    the bundle (not a link, which could point anywhere or change after the check), and, with
    ``verify``, the SHA-256 the entry records."""
    name = entry.path
    if not name:
        raise BundleError(f"{where}: path {name!r} is not a file name")
    if Path(name).name != name:
        raise BundleError(f"{where}: {name!r} is outside the bundle (entries name its files)")
    file_path = root / name
    if file_path.is_symlink():
        raise BundleError(f"{where}: {name!r} is a symbolic link; bundles hold regular files")
    if not file_path.is_file():
        raise BundleError(f"model bundle {root} is incomplete: {name} is missing")
    if verify:
        actual = sha256_file(file_path)
        if actual != entry.sha256:
            raise BundleError(
                f"{file_path} does not match its manifest (sha256 {actual[:12]}..., "
                f"expected {entry.sha256[:12]}...): the bundle was altered or truncated"
            )
    return file_path


def _load_directions(root: Path, spec: Manifest, verify: bool) -> LatentDirections:
    """The bundle's ``directions.json``, hash-checked against the manifest and checked for shape,
    finiteness and orthonormality."""
    entry = spec.directions
    assert entry is not None  # the caller checks
    where = f"{root / MANIFEST_NAME}: entry 'directions'"
    if entry.format_version != DIRECTIONS_VERSION:
        raise BundleError(
            f"{where} has format_version {entry.format_version!r}; this server reads version "
            f"{DIRECTIONS_VERSION}"
        )
    file_path = _checked_file(root, entry, where, verify)
    latent_dim = spec.latent_dim
    try:
        raw = json.loads(file_path.read_text(encoding="utf-8"))
        mean = np.asarray(raw["mean"], dtype=np.float64)
        components = np.asarray(raw["components"], dtype=np.float64)
        variances = np.asarray(raw["variances"], dtype=np.float64)
        total = float(raw["total_variance"])
        directions = LatentDirections(
            method=str(raw["method"]),
            mean=mean,
            components=components,
            variances=variances,
            total_variance=total,
            samples=int(raw["samples"]),
            data=str(raw["data"]),
        )
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{file_path} is not a valid directions file: {exc!r}") from exc
    k = len(variances)
    if mean.shape != (latent_dim,) or components.shape != (k, latent_dim) or k < 1:
        raise BundleError(
            f"{file_path}: expected a mean of {latent_dim} numbers and k >= 1 components of "
            f"{latent_dim} numbers with k variances; got mean {mean.shape}, components "
            f"{components.shape}, variances {variances.shape}"
        )
    values = np.concatenate([mean, components.ravel(), variances, [total]])
    if not np.isfinite(values).all() or (variances < 0).any():
        raise BundleError(f"{file_path}: values must be finite and variances >= 0")
    error = np.abs(components @ components.T - np.eye(k)).max()
    if error > ORTHONORMAL_TOLERANCE:
        raise BundleError(f"{file_path}: components are not orthonormal (error {error:.2g})")
    return directions


BENTOML_PREFIX = "bentoml:"


def resolve_bundle_dir(spec: str | os.PathLike[str]) -> Path:
    """Where the bundle named by ``spec`` (the value of ``AEGAN_MODEL``) lives.

    ``spec`` is a bundle directory, or a BentoML model-store tag: ``bentoml:NAME[:VERSION]``
    explicitly, or a plain ``NAME[:VERSION]`` that is not a directory. A store model holds the
    bundle's files in its ``path``.
    """
    text = os.fspath(spec)
    explicit = text.startswith(BENTOML_PREFIX)
    if not explicit and Path(text).is_dir():
        return Path(text)
    tag = text[len(BENTOML_PREFIX) :] if explicit else text
    import bentoml  # deferred: only model-store lookups need it
    from bentoml.exceptions import BentoMLException

    try:
        return Path(bentoml.models.get(tag).path)
    except (BentoMLException, ValueError) as exc:
        if explicit:
            raise BundleError(f"model {tag!r} is not in the BentoML model store: {exc}") from exc
        raise BundleError(
            f"model {text!r} is neither a bundle directory nor a model in the BentoML store"
        ) from exc
