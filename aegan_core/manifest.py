"""``manifest.json``, the one schema of a bundle's description: the :class:`Manifest` model that the
exporter writes and every reader (service, batch jobs, evaluation, export) loads.

A field is declared once, here, with its type and meaning; a bundle field is added by adding a
line to :class:`Manifest` (optional, so that older bundles still load) and using it. Keys a reader
does not know are kept as they are (``extra="allow"``), so that an older reader can still load a
newer bundle of the same format version. A change that older readers would misread bumps
:data:`FORMAT_VERSION`; a newer version is refused with a message naming both versions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FORMAT_VERSION = 1

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

Sha256 = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file, 64 hex digits")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class GraphEntry(_Entry):
    """One ONNX graph of the bundle."""

    path: str  # its file name, directly in the bundle directory
    sha256: str = Sha256
    bytes: int | None = Field(default=None, ge=0)  # its size
    input: str  # name of the graph's input tensor
    output: str  # name of its output tensor


class DirectionsEntry(_Entry):
    """The optional ``directions.json``: principal directions of the encoder's latents."""

    format_version: int  # of the directions file and this entry
    path: str
    sha256: str = Sha256
    bytes: int | None = Field(default=None, ge=0)
    method: str | None = None  # "pca"
    count: int | None = Field(default=None, ge=1)  # directions stored
    samples: int | None = Field(default=None, ge=1)  # training samples encoded
    data: str | None = None  # what they were, e.g. "fashion-mnist:train"


class Manifest(_Entry):
    """What a bundle is and holds. Required: the first eight fields."""

    format_version: int  # FORMAT_VERSION of the writer
    name: str = Field(min_length=1)  # the model's name
    kind: Literal["image", "vector"]  # images (data shape C, H, W) or vectors (data shape D)
    data_shape: tuple[int, ...] = Field(min_length=1)  # (C, H, W) or (D,), each >= 1
    latent_dim: int = Field(ge=1)
    latent_prior: str  # "normal" or "uniform" (aegan_core.latents)
    files: dict[str, GraphEntry]  # by role (FILE_NAMES); generator and encoder required
    opset: int = Field(ge=1)  # ONNX opset of the graphs
    arch: str | None = None  # network family: "conv" or "mlp"
    pixel_range: tuple[float, float] | None = None  # images: pixel values the graphs take
    normalisation: str | None = None  # images: how 8-bit pixels map to that range
    exporter: str | None = None  # torch's ONNX exporter used
    versions: dict[str, str] | None = None  # of the packages that exported it
    parity: dict[str, Any] | None = None  # ONNX Runtime against PyTorch, per graph
    metrics: dict[str, Any] | None = None  # flat metrics measured at export
    evaluation: list[dict[str, Any]] | None = None  # the evaluation records, with their context
    training_config: dict[str, Any] | None = None  # the run's resolved config
    step: int | None = Field(default=None, ge=0)  # training step of the exported weights
    source_checkpoint: str | None = None  # the checkpoint's file name
    exported_at: str | None = None  # ISO 8601, UTC
    directions: DirectionsEntry | None = None

    @field_validator("data_shape")
    @classmethod
    def _positive(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 1 for d in shape):
            raise ValueError(f"every dimension must be at least 1, got {list(shape)}")
        return shape

    @field_validator("files")
    @classmethod
    def _required_roles(cls, files: dict[str, GraphEntry]) -> dict[str, GraphEntry]:
        for role in REQUIRED_ROLES:
            if role not in files:
                raise ValueError(f"names no {role!r} graph ({FILE_NAMES[role]})")
        return files

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json``: the fields that were set (a bundle's
        explicit nulls included) and the unknown keys it came with."""
        return self.model_dump(mode="json", exclude_unset=True)


class ManifestError(ValueError):
    """The manifest does not fit :class:`Manifest`; the message names each field and problem."""


def parse_manifest(raw: object) -> Manifest:
    """``raw`` (the decoded JSON) as a :class:`Manifest`: a newer format version, missing fields
    and malformed ones raise :class:`ManifestError` with one readable line."""
    if not isinstance(raw, dict):
        raise ManifestError("must hold a JSON object")
    required = [name for name, f in Manifest.model_fields.items() if f.is_required()]
    missing = [k for k in required if k not in raw]
    if missing:
        raise ManifestError(f"lacks required keys: {', '.join(missing)}")
    version = raw["format_version"]
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"has format_version {version!r}; this server reads version {FORMAT_VERSION}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        said: dict[tuple[str, str], list[str]] = {}  # (where, problem) -> the fields it concerns
        for error in exc.errors():
            where, problem, name = _said(error)
            said.setdefault((where, problem), []).append(name)
        raise ManifestError(
            "; ".join(
                where.format(f"{', '.join(n for n in names if n)}: {problem}".lstrip(": "))
                for (where, problem), names in said.items()
            )
        ) from None


def _said(error: Any) -> tuple[str, str, str]:
    """One pydantic error as this project says it: (where, with ``{}`` for the details; the
    problem; the field it concerns), so that one problem of several fields is said once."""
    loc = [str(part) for part in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if loc == ["kind"]:
        return "kind must be 'image' or 'vector'", "", ""
    if loc == ["files"] and error["type"] == "dict_type":
        return "'files' must be an object", "", ""
    if loc[:1] == ["files"] and len(loc) > 1:
        return f"entry for {loc[1]!r} is malformed ({{}})", message, ".".join(loc[2:])
    if loc[:1] == ["directions"]:
        return "entry 'directions' is malformed ({})", message, ".".join(loc[1:])
    return "{}", message, ".".join(loc)
