"""The AEGAN HTTP service: sample, generate, encode, decode, reconstruct, interpolate and info.

Start it from the repository root with ``bentoml serve`` (the service is named in bentofile.yaml);
``AEGAN_MODEL`` selects the bundle. Settings and limits: aegan_serve/config.py. Endpoint reference
with examples: docs/SERVING.md. Health (/livez, /readyz), /metrics and OpenAPI come from BentoML.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import logging
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
import numpy as np
from annotated_types import Ge, Le, Len
from bentoml.validators import ContentType
from PIL import Image
from pydantic import BaseModel, Field

from . import __version__
from .bundle import load_bundle, resolve_bundle_dir
from .config import Settings
from .errors import RequestError, WrongModelKind
from .images import encode_gif, encode_png, load_uploads, make_grid, png_base64, to_pil, to_uint8
from .latents import (
    LATENT_ABS_MAX,
    MAX_SEED,
    check_latents,
    interpolate,
    prior_name,
    random_seed,
    sample_prior,
)
from .middleware import RequestGuard
from .runtime import ModelRuntime
from .ui import UI_PATH, ui_app

logger = logging.getLogger("bentoml.aegan_serve")

# Read at import: the limits are part of the API schema below. The model and device are read again
# when a worker starts (AEGAN.__init__).
SETTINGS = Settings.from_env()
LIMITS = SETTINGS.limits
PSNR_CAP_DB = 100.0  # reported for a perfect reconstruction instead of infinity

# Request field types: their bounds are in the OpenAPI schema and checked before any work is done.
Count = Annotated[int, Ge(1), Le(LIMITS.max_n)]
Seed = Annotated[int, Ge(0), Le(MAX_SEED)]
Truncation = Annotated[float, Ge(0.0), Le(1.0)]
Coordinate = Annotated[float, Field(allow_inf_nan=False, ge=-LATENT_ABS_MAX, le=LATENT_ABS_MAX)]
Latents = Annotated[list[list[Coordinate]], Len(1, LIMITS.max_n)]
Uploads = Annotated[list[Path], Len(1, LIMITS.max_images)]
Steps = Annotated[int, Ge(2), Le(LIMITS.max_steps)]
FrameMs = Annotated[int, Ge(20), Le(10_000)]


class Decoded(BaseModel):
    images: list[str] = Field([], description="base64 PNG per latent (image models, or empty)")
    vectors: list[list[float]] = Field([], description="data per latent (vector models, or empty)")


class Generated(Decoded):
    seed: int = Field(description="seed of the latents; send it back to get the same result")
    latents: list[list[float]]


class Encoded(BaseModel):
    latents: list[list[float]] = Field(description="one latent per uploaded image, in order")


class Reconstructed(BaseModel):
    latents: list[list[float]]
    images: list[str] = Field(description="base64 PNG of each reconstruction G(E(x))")
    mse: list[float] = Field(description="mean squared error per image, pixels in [0, 1]")
    psnr: list[float] = Field(description=f"PSNR per image in dB (peak 1, at most {PSNR_CAP_DB:g})")


class BatchItem(BaseModel):
    latent: list[float] = Field([], description="the latent (empty when there is an error)")
    error: str = Field("", description="why the item could not be encoded (empty if it was)")


@bentoml.service(
    name="aegan",
    workers=SETTINGS.workers,
    resources={"cpu": "2", "memory": "2Gi"},
    traffic={"timeout": 60},
)
class AEGAN:
    """Generator G (z -> x) and encoder E (x -> z) of one AEGAN bundle on ONNX Runtime."""

    def __init__(self) -> None:
        settings = Settings.from_env()
        self.bundle = load_bundle(resolve_bundle_dir(settings.model))  # verifies SHA-256
        self.model = ModelRuntime(
            self.bundle, settings.device, settings.threads, fp16=settings.fp16
        )
        self.prior = prior_name(self.bundle.manifest["latent_prior"])
        self.batch_sizes: Counter[int] = Counter()  # images per adaptive /encode batch
        logger.info(
            "model %r from %s: %s %s, latent_dim %d; ONNX Runtime %s (%s, %d threads)",
            self.bundle.name,
            self.bundle.path,
            self.bundle.kind,
            self.bundle.data_shape,
            self.bundle.latent_dim,
            self.model.provider,
            self.model.precision,
            self.model.threads,
        )

    @bentoml.api
    def sample(
        self,
        ctx: bentoml.Context,
        n: Count = 16,
        seed: Seed | None = None,
        truncation: Truncation = 1.0,
    ) -> Image.Image:
        """A PNG grid of ``n`` generated images, ceil(sqrt(n)) per row. A seed makes it repeatable;
        without one a random seed is drawn. The seed used is in the ``X-Seed`` response header."""
        self._require_images("sample")
        seed, latents = self._draw(n, seed, truncation)
        ctx.response.headers["X-Seed"] = str(seed)
        return to_pil(make_grid(self.model.generate(latents)))

    @bentoml.api
    def generate(
        self, n: Count = 16, seed: Seed | None = None, truncation: Truncation = 1.0
    ) -> Generated:
        """``n`` samples as JSON: the seed, the latents and the images as base64 PNG (image models)
        or the vectors (vector models)."""
        seed, latents = self._draw(n, seed, truncation)
        return Generated(seed=seed, latents=latents.tolist(), **self._decode(latents))

    @bentoml.api
    async def encode(self, images: Uploads) -> Encoded:
        """One latent per uploaded image, in upload order. Concurrent requests are encoded together
        through the adaptively batched ``encode_batch``."""
        self._require_images("encode")
        batch = await asyncio.to_thread(self._load, images)  # decoding is CPU work
        packed = [base64.b64encode(x.astype("<f4").tobytes()).decode("ascii") for x in batch]
        items = await self.to_async.encode_batch(packed)  # through BentoML's batching dispatcher
        if any(item.error for item in items):  # the items were made just above: a bug
            raise RuntimeError(f"encode_batch refused its own input: {items[0].error}")
        return Encoded(latents=[item.latent for item in items])

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.batch_size,
        max_latency_ms=SETTINGS.batch_latency_ms,
    )
    def encode_batch(self, items: list[str]) -> list[BatchItem]:
        """Batched encoder behind /encode. Each item is one preprocessed model input: C*H*W float32
        little-endian values in [-1, 1], base64. Answers a latent, or an error, per item."""
        self.batch_sizes[len(items)] += 1
        inputs = [self._unpack(item) for item in items]
        valid = [x for x in inputs if isinstance(x, np.ndarray)]
        latents = iter(self.model.encode(np.stack(valid)).tolist() if valid else [])
        return [
            BatchItem(latent=next(latents)) if isinstance(x, np.ndarray) else BatchItem(error=x)
            for x in inputs
        ]

    @bentoml.api
    def decode(self, latents: Latents) -> Decoded:
        """Latent vectors -> images as base64 PNG (image models) or vectors (vector models)."""
        z = check_latents(latents, self.bundle.latent_dim, "latents")
        return Decoded(**self._decode(z))

    @bentoml.api
    def reconstruct(self, images: Uploads) -> Reconstructed:
        """G(E(x)) for each uploaded image x, with its latent and the per-image error against the
        preprocessed upload."""
        self._require_images("reconstruct")
        x = self._load(images)
        z = self.model.encode(x)
        x_hat = np.clip(self.model.generate(z), -1.0, 1.0)
        mse = (((x_hat - x) / 2.0) ** 2).reshape(len(x), -1).mean(axis=1)  # pixels in [0, 1]
        return Reconstructed(
            latents=z.tolist(),
            images=[png_base64(tile) for tile in to_uint8(x_hat)],
            mse=mse.tolist(),
            psnr=[min(PSNR_CAP_DB, -10.0 * math.log10(max(e, 1e-30))) for e in mse.tolist()],
        )

    @bentoml.api
    def interpolate(
        self,
        ctx: bentoml.Context,
        # An empty list, not None, when absent: BentoML 1.4 cannot take optional file lists.
        images: Annotated[list[Path], Len(0, 2)] = Field(default_factory=list),
        seeds: Annotated[list[Seed] | None, Len(2, 2)] = None,
        latents: Annotated[list[list[Coordinate]] | None, Len(2, 2)] = None,
        steps: Steps = 8,
        method: Literal["slerp", "lerp"] = "slerp",
        format: Literal["gif", "png"] = "gif",
        truncation: Truncation = 1.0,
        frame_ms: FrameMs = 100,
    ) -> Annotated[Path, ContentType("image/*")]:
        """``steps`` images on the path between two end points, given as exactly one of: two
        uploaded images (encoded by E, so the ends are their reconstructions), two seeds, or two
        latents. Answers an animated GIF, or a PNG strip with the frames left to right."""
        self._require_images("interpolate")
        sources = {"images": images or None, "seeds": seeds, "latents": latents}
        given = [name for name, value in sources.items() if value is not None]
        if len(given) != 1:
            raise RequestError(
                "give exactly one of: images (2 uploads), seeds (2 integers) or latents "
                f"(2 vectors); got {', '.join(given) or 'none'}"
            )
        if len(images) == 1:
            raise RequestError("images needs 2 uploads (the two end points); got 1")
        if images:
            ends = self.model.encode(self._load(images))
        elif seeds is not None:
            ends = np.concatenate([self._draw(1, s, truncation)[1] for s in seeds])
        else:
            ends = check_latents(latents or [], self.bundle.latent_dim, "latents")
        frames = self.model.generate(interpolate(ends[0], ends[1], steps, method))
        if format == "gif":
            data = encode_gif(frames, frame_ms)
        else:
            data = encode_png(make_grid(frames, nrow=steps))
        path = Path(ctx.temp_dir) / f"interpolation.{format}"
        path.write_bytes(data)
        return path

    @bentoml.api
    def info(self) -> dict[str, Any]:
        """The model (name, shapes, prior, metrics measured at export), the execution provider in
        use, the request limits and the adaptive batching seen so far by this worker."""
        sizes = self.batch_sizes
        return {
            "model": {
                "name": self.bundle.name,
                "kind": self.bundle.kind,
                "data_shape": list(self.bundle.data_shape),
                "latent_dim": self.bundle.latent_dim,
                "latent_prior": self.prior,
                "path": str(self.bundle.path),
                "metrics": self.bundle.metrics,
                # Latent directions for the explorer page (/ui); null when the bundle has none.
                "directions": self.bundle.directions and self.bundle.directions.to_json(),
            },
            "runtime": {
                "provider": self.model.provider,
                "precision": self.model.precision,
                "threads": self.model.threads,
                "workers": SETTINGS.workers,
            },
            "limits": {
                **{LIMITS.env_name(k): v for k, v in asdict(LIMITS).items()},
                "AEGAN_BATCH_SIZE": SETTINGS.batch_size,
                "AEGAN_BATCH_LATENCY_MS": SETTINGS.batch_latency_ms,
            },
            "encode_batches": {
                "count": sum(sizes.values()),
                "largest": max(sizes, default=0),
                "sizes": {str(k): v for k, v in sorted(sizes.items())},
            },
            "version": __version__,
        }

    # --- helpers ---------------------------------------------------------------------------------

    def _require_images(self, endpoint: str) -> None:
        if self.bundle.kind != "image":
            raise WrongModelKind(
                f"model {self.bundle.name!r} is a vector model (data shape "
                f"{list(self.bundle.data_shape)}), and /{endpoint} works with images only; "
                "/generate and /decode return its vectors"
            )

    def _draw(self, n: int, seed: int | None, truncation: float) -> tuple[int, np.ndarray]:
        seed = random_seed() if seed is None else seed
        latents = sample_prior(n, self.bundle.latent_dim, seed, truncation, self.prior)
        return seed, latents

    def _decode(self, latents: np.ndarray) -> dict[str, Any]:
        data = self.model.generate(latents)
        if self.bundle.kind == "image":
            return {"images": [png_base64(tile) for tile in to_uint8(data)]}
        return {"vectors": data.tolist()}

    def _load(self, uploads: list[Path]) -> np.ndarray:
        return load_uploads(
            uploads,
            self.bundle.data_shape,  # type: ignore[arg-type]
            max_bytes=LIMITS.max_upload_bytes,
            max_pixels=LIMITS.max_pixels,
        )

    def _unpack(self, item: str) -> np.ndarray | str:
        """One ``encode_batch`` item -> a model input, or the reason it is not one."""
        shape = self.bundle.data_shape
        try:
            x = np.frombuffer(base64.b64decode(item, validate=True), dtype="<f4")
        except (binascii.Error, ValueError):
            return "not base64 of float32 values"
        if x.size != math.prod(shape):
            return f"{x.size} values; the model takes {math.prod(shape)} ({shape})"
        if not np.isfinite(x).all() or np.abs(x).max() > 1.0:
            return "values must be finite and within [-1, 1]"
        return x.reshape(shape).astype(np.float32)


for _api in AEGAN.apis.values():  # OpenAPI shows these docstrings: drop their source indentation
    _api.doc = inspect.cleandoc(_api.doc or "")

# The latent explorer page: static files that call the endpoints above (aegan_serve/ui.py).
AEGAN.mount_asgi_app(ui_app(), path=UI_PATH, name="ui")

# Size and form-body checks before BentoML parses a request (see aegan_serve/middleware.py).
AEGAN.add_asgi_middleware(
    RequestGuard,
    max_bytes=LIMITS.max_request_bytes,
    routes={api.route: api.input_spec.multipart_fields for api in AEGAN.apis.values()},
)
