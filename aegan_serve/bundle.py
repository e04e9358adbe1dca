"""The model bundle: a directory holding ``generator.onnx``, ``encoder.onnx`` and ``manifest.json``.

This module is the single definition of the bundle format. ``export/`` writes bundles with
:func:`write_manifest`; the service loads them with :func:`load_bundle`, which verifies the
SHA-256 of every file named in the manifest and refuses a bundle that is incomplete or altered.

No torch here: the serving image carries none.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Graph roles and their file names. fp16 variants are optional (GPU serving).
GENERATOR = "generator"
ENCODER = "encoder"
GENERATOR_FP16 = "generator_fp16"
ENCODER_FP16 = "encoder_fp16"
FILE_NAMES = {
    GENERATOR: "generator.onnx",
    ENCODER: "encoder.onnx",
    GENERATOR_FP16: "generator.fp16.onnx",
    ENCODER_FP16: "encoder.fp16.onnx",
}
REQUIRED_ROLES = (GENERATOR, ENCODER)

# Tensor names of the exported graphs (batch dimension dynamic).
LATENT_TENSOR = "z"  # (B, latent_dim) float32
DATA_TENSOR = "x"  # (B, C, H, W) float32 in [-1, 1] for images; (B, D) float32 for vectors

REQUIRED_KEYS = (
    "format_version",
    "name",
    "kind",
    "data_shape",
    "latent_dim",
    "latent_prior",
    "files",
    "opset",
)


class BundleError(ValueError):
    """A bundle is missing, incomplete, altered or malformed. The message names the file."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory, its manifest and the paths of its graphs."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def kind(self) -> str:
        """``"image"`` (data shape C, H, W) or ``"vector"`` (data shape D)."""
        return str(self.manifest["kind"])

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.manifest["data_shape"])

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics") or {})

    def has(self, role: str) -> bool:
        return role in self.manifest["files"]

    def file(self, role: str) -> Path:
        """Path of the graph with this role (``generator``, ``encoder``, ``generator_fp16``...)."""
        if role not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path} has no {role!r} graph")
        return self.path / self.manifest["files"][role]["path"]

    def tensor_names(self, role: str) -> tuple[str, str]:
        entry = self.manifest["files"][role]
        return str(entry["input"]), str(entry["output"])


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


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (checked for the required keys) and fsync it."""
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"manifest lacks required keys: {', '.join(missing)}")
    path = Path(bundle_dir) / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


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
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks required keys: {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path} has format_version {manifest['format_version']!r}; "
            f"this server reads version {FORMAT_VERSION}"
        )
    if manifest["kind"] not in ("image", "vector"):
        raise BundleError(f"{manifest_path}: kind must be 'image' or 'vector'")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{manifest_path}: 'files' must be an object")
    for role in REQUIRED_ROLES:
        if role not in files:
            raise BundleError(f"{manifest_path} names no {role!r} graph ({FILE_NAMES[role]})")
    for role, entry in files.items():
        if not isinstance(entry, dict) or not {"path", "sha256", "input", "output"} <= set(entry):
            raise BundleError(f"{manifest_path}: entry for {role!r} is malformed")
        file_path = root / entry["path"]
        if file_path.parent.resolve() != root.resolve():
            raise BundleError(f"{manifest_path}: {entry['path']!r} is outside the bundle")
        if not file_path.is_file():
            raise BundleError(f"model bundle {root} is incomplete: {entry['path']} is missing")
        if verify:
            actual = sha256_file(file_path)
            if actual != entry["sha256"]:
                raise BundleError(
                    f"{file_path} does not match its manifest (sha256 {actual[:12]}..., "
                    f"expected {str(entry['sha256'])[:12]}...): the bundle was altered or truncated"
                )
    return Bundle(path=root, manifest=manifest)


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
