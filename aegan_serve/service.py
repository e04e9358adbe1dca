"""The AEGAN HTTP service: sample, generate, encode, decode, reconstruct, interpolate and info.

Start it from the repository root with ``bentoml serve`` (the service is named in bentofile.yaml);
``AEGAN_MODEL`` selects the bundle. Settings and limits: aegan_serve/config.py. Endpoint reference
with examples: docs/SERVING.md. Health (/livez, /readyz), /metrics and OpenAPI come from BentoML.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

import bentoml
import numpy as np
from annotated_types import Ge, Le, Len
from bentoml.validators import ContentType, FileSchema
from PIL import Image
from pydantic import BaseModel, Field, Strict
from starlette.datastructures import UploadFile
from starlette.responses import Response

from aegan_core.bundle import load_bundle, resolve_bundle_dir
from aegan_core.errors import Overloaded, RequestError, WrongModelKind
from aegan_core.images import (
    PSNR_CAP_DB,
    encode_gif,
    encode_png,
    load_uploads,
    make_grid,
    per_sample_mse,
    png_base64,
    psnr,
    to_uint8,
    to_unit,
)
from aegan_core.latents import (
    LATENT_ABS_MAX,
    MAX_SEED,
    check_latents,
    interpolate,
    prior_name,
    random_seed,
    sample_prior,
)
from aegan_core.runtime import ModelRuntime

from . import __version__
from .answers import answers_client_errors
from .auth import AccessSettings, Gate, access_in_force, spend_images
from .batching import Batcher
from .config import Settings, SettingsError, available_cpus, gpu_visible
from .middleware import RequestGuard
from .openapi import OpenAPICompletion
from .ui import UI_PATH, ui_app

logger = logging.getLogger("bentoml.aegan_serve")

# Read at import: the limits are part of the API schema below. The model and device are read again
# when a worker starts (AEGAN.__init__).
SETTINGS = Settings.from_env()
LIMITS = SETTINGS.limits
# `bentoml serve` imports this module before it starts any worker: a bundle that does not load
# (missing, altered, not a bundle) or a bad AEGAN_* value above stops it here with the reason and a
# non-zero exit status, instead of workers failing and being restarted forever behind an open port.
STARTUP_BUNDLE = load_bundle(resolve_bundle_dir(SETTINGS.model))
if SETTINGS.device == "cuda" and not gpu_visible():
    raise SettingsError("AEGAN_DEVICE=cuda but no NVIDIA GPU is visible (no /dev/nvidiactl)")
# API keys and quotas (aegan_serve/auth.py): a keys file or quota setting that cannot be used stops
# the server here too.
ACCESS = AccessSettings.from_env(workers=SETTINGS.workers)
INLINE_MAX_IMAGES = 1  # requests making at most this many images run on the event loop
IMAGE_ONLY = ("/sample", "/encode", "/reconstruct", "/interpolate")  # 422 on a vector model
IN_USE = {"latent_dim": STARTUP_BUNDLE.latent_dim}  # the bundle of this worker
# The scope a key needs for each endpoint (None: any valid key); aegan_serve/apikeys.py lists them.
SCOPES = {
    "/sample": "generate",
    "/generate": "generate",
    "/decode": "generate",
    "/interpolate": "generate",
    "/encode": "encode",
    "/reconstruct": "encode",
    "/info": None,
}
T = TypeVar("T")


class Upload(PurePosixPath):
    """One uploaded file, held in memory: its name is the client's file name, ``data`` its bytes.

    BentoML's ``Path`` fields first write every upload to a new file in the request's temporary
    directory, a file system round trip per image for uploads this small. Starlette still spools
    a part over 1 MiB to disk.
    """

    data: bytes


class InMemoryFile(FileSchema):
    """A multipart file field (the OpenAPI schema of ``Path``) whose value is an :class:`Upload`."""

    def decode(self, obj: Any) -> Upload:
        if isinstance(obj, UploadFile):
            name, data = obj.filename or "upload", obj.file.read()
        elif isinstance(obj, bytes):
            name, data = "upload", obj
        elif isinstance(obj, Path):  # a local call (e.g. in a test) with a file on disk
            name, data = obj.name, obj.read_bytes()
        else:
            raise ValueError("expected an uploaded file")
        upload = Upload(Path(name).name or "upload")
        upload.data = data
        return upload


# Request field types: their bounds are in the OpenAPI schema and checked before any work is done.
# Strict: a number is a JSON number (not `true`, not "0.5"), as the document says.
Count = Annotated[int, Strict(), Ge(1), Le(LIMITS.max_n)]
Seed = Annotated[int, Strict(), Ge(0), Le(MAX_SEED)]
Truncation = Annotated[float, Strict(), Ge(0.0), Le(1.0)]
Coordinate = Annotated[
    float, Field(strict=True, allow_inf_nan=False, ge=-LATENT_ABS_MAX, le=LATENT_ABS_MAX)
]
Latents = Annotated[list[list[Coordinate]], Len(1, LIMITS.max_n)]
UploadedFile = Annotated[Upload, InMemoryFile()]
Uploads = Annotated[list[UploadedFile], Len(1, LIMITS.max_images)]
Steps = Annotated[int, Strict(), Ge(2), Le(LIMITS.max_steps)]
FrameMs = Annotated[int, Strict(), Ge(20), Le(10_000)]


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
        IN_USE["latent_dim"] = self.bundle.latent_dim  # for the OpenAPI document
        self.model = ModelRuntime(
            self.bundle, settings.device, settings.threads, fp16=settings.fp16
        )
        self.prior = prior_name(self.bundle.spec.latent_prior)
        # Decoding uploads, running the generator and encoding PNGs: a pool bounded by the CPUs.
        self.pool_size = max(1, available_cpus() // settings.workers)
        self.workers = ThreadPoolExecutor(self.pool_size, thread_name_prefix="aegan-work")
        self.max_wait_s = settings.batch_latency_ms / 1000
        # Every encoder run goes through one queue that batches concurrent requests together.
        batch_images = encoder_batch_histogram()

        def encode(batch: np.ndarray) -> np.ndarray:
            batch_images.observe(len(batch))
            return self.model.encode(batch)

        self.encoder = Batcher(
            encode,
            max_batch=settings.batch_size,
            max_queue=settings.max_queue,
            max_wait_s=settings.batch_latency_ms / 1000,
            executor=ThreadPoolExecutor(1, thread_name_prefix="aegan-encoder"),
            name="encoder",
            inline_rows=INLINE_MAX_IMAGES,
        )
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

    # The image endpoints answer a ready Response with the PNG/GIF bytes they made in a worker
    # thread (the annotations keep the OpenAPI schema and BentoML's client decoding): BentoML would
    # otherwise encode a PIL image on the event loop, or write the bytes to a temporary file.

    @bentoml.api
    @answers_client_errors
    async def sample(
        self, n: Count = 16, seed: Seed | None = None, truncation: Truncation = 1.0
    ) -> Image.Image:
        """A PNG grid of ``n`` generated images, ceil(sqrt(n)) per row. A seed makes it repeatable;
        without one a random seed is drawn. The seed used is in the ``X-Seed`` response header."""
        self._require_images("sample")
        await spend_images(n)
        seed, latents = self._draw(n, seed, truncation)
        png = await self._compute(n, lambda: encode_png(make_grid(self.model.generate(latents))))
        return Response(png, media_type="image/png", headers={"X-Seed": str(seed)})  # type: ignore[return-value]

    @bentoml.api
    @answers_client_errors
    async def generate(
        self, n: Count = 16, seed: Seed | None = None, truncation: Truncation = 1.0
    ) -> Generated:
        """``n`` samples as JSON: the seed, the latents and the images as base64 PNG (image models)
        or the vectors (vector models)."""
        await spend_images(n)
        seed, latents = self._draw(n, seed, truncation)
        decoded = await self._compute(n, lambda: self._decode(latents))
        return Generated(seed=seed, latents=latents.tolist(), **decoded)

    @bentoml.api
    @answers_client_errors
    async def encode(self, images: Uploads) -> Encoded:
        """One latent per uploaded image, in upload order. Concurrent requests are encoded together
        (cross-request batching, see ``AEGAN_BATCH_SIZE``)."""
        self._require_images("encode")
        await spend_images(len(images))
        z = await self.encoder(await self._load(images))
        return Encoded(latents=z.tolist())

    @bentoml.api
    @answers_client_errors
    async def decode(self, latents: Latents) -> Decoded:
        """Latent vectors -> images as base64 PNG (image models) or vectors (vector models)."""
        z = check_latents(latents, self.bundle.latent_dim, "latents")
        await spend_images(len(z))
        return Decoded(**await self._compute(len(z), lambda: self._decode(z)))

    @bentoml.api
    @answers_client_errors
    async def reconstruct(self, images: Uploads) -> Reconstructed:
        """G(E(x)) for each uploaded image x, with its latent and the per-image error against the
        preprocessed upload."""
        self._require_images("reconstruct")
        await spend_images(len(images))
        x = await self._load(images)
        z = await self.encoder(x)
        return await self._compute(len(x), lambda: self._reconstructed(x, z))

    @bentoml.api
    @answers_client_errors
    async def interpolate(
        self,
        # An empty list, not None, when absent: BentoML 1.4 cannot take optional file lists.
        images: Annotated[list[UploadedFile], Len(0, 2)] = Field(default_factory=list),
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
        await spend_images(steps)
        if images:
            ends = await self.encoder(await self._load(images))
        elif seeds is not None:
            ends = np.concatenate([self._draw(1, s, truncation)[1] for s in seeds])
        else:
            ends = check_latents(latents or [], self.bundle.latent_dim, "latents")
        data = await self._compute(
            steps, lambda: self._animation(ends, steps, method, format, frame_ms)
        )
        return Response(data, media_type=f"image/{format}")  # type: ignore[return-value]

    @bentoml.api
    @answers_client_errors
    def info(self) -> dict[str, Any]:
        """The model (name, shapes, prior, metrics measured at export), the execution provider in
        use, the request limits and the encoder batches run so far by this worker."""
        sizes = self.encoder.sizes
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
                "AEGAN_MAX_QUEUE": SETTINGS.max_queue,
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

    async def _compute(self, images: int, work: Callable[[], T]) -> T:
        """``work()`` for a request of ``images`` images: on the event loop when it is this small
        (the hop to a thread and back costs more than it), else in the worker pool."""
        if images <= INLINE_MAX_IMAGES:
            return work()
        return await self._in_pool(work)

    async def _in_pool(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in the worker pool, refused (429) instead of run when it waited for a
        thread longer than ``AEGAN_BATCH_LATENCY_MS``: work beyond what the CPUs can do in time
        is shed rather than piled up until BentoML's request timeout answers 504."""
        queued = time.monotonic()

        def run() -> T:
            waited = time.monotonic() - queued
            if waited > self.max_wait_s:
                raise Overloaded(
                    f"waited {waited:.1f} s for a worker thread, longer than "
                    f"{self.max_wait_s:g} s; retry shortly"
                )
            return work(*args)

        return await asyncio.get_running_loop().run_in_executor(self.workers, run)

    async def _load(self, uploads: list[Upload]) -> np.ndarray:
        """Decode and convert uploads in the worker pool, off the event loop; the uploads of one
        request are split over the pool's threads (Pillow's codecs release the GIL)."""
        size = math.ceil(len(uploads) / self.pool_size)
        parts = await asyncio.gather(
            *(
                self._in_pool(self._convert, uploads[i : i + size], i)
                for i in range(0, len(uploads), size)
            )
        )
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _convert(self, uploads: list[Upload], first_index: int) -> np.ndarray:
        return load_uploads(
            [upload.data for upload in uploads],
            self.bundle.data_shape,  # type: ignore[arg-type]
            max_bytes=LIMITS.max_upload_bytes,
            max_pixels=LIMITS.max_pixels,
            first_index=first_index,
        )

    def _reconstructed(self, x: np.ndarray, z: np.ndarray) -> Reconstructed:
        x_hat = self.model.generate(z)
        unit, unit_hat = to_unit(x), to_unit(x_hat)  # errors of pixels in [0, 1]
        return Reconstructed(
            latents=z.tolist(),
            images=[png_base64(tile) for tile in to_uint8(x_hat)],
            mse=per_sample_mse(unit, unit_hat).tolist(),
            psnr=psnr(unit, unit_hat).tolist(),
        )

    def _animation(
        self, ends: np.ndarray, steps: int, method: str, format: str, frame_ms: int
    ) -> bytes:
        frames = self.model.generate(interpolate(ends[0], ends[1], steps, method))
        if format == "gif":
            return encode_gif(frames, frame_ms)
        return encode_png(make_grid(frames, nrow=steps))


_ENCODER_BATCH_HISTOGRAM: Any = None


def encoder_batch_histogram() -> Any:
    """The Prometheus histogram of images per encoder run, shown at /metrics for all workers.
    Made when the first worker starts (BentoML sets up multi-process metrics before that), once
    per process."""
    global _ENCODER_BATCH_HISTOGRAM
    if _ENCODER_BATCH_HISTOGRAM is None:
        from prometheus_client import Histogram

        _ENCODER_BATCH_HISTOGRAM = Histogram(
            "aegan_encoder_batch_images",
            "Images per encoder run (concurrent requests batched together)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
    return _ENCODER_BATCH_HISTOGRAM


for _api in AEGAN.apis.values():  # OpenAPI shows these docstrings: drop their source indentation
    _api.doc = inspect.cleandoc(_api.doc or "")

# The latent explorer page: static files that call the endpoints above (aegan_serve/ui.py).
AEGAN.mount_asgi_app(ui_app(), path=UI_PATH, name="ui")

# /docs.json as the service behaves: every error answer, latent lengths (aegan_serve/openapi.py).
AEGAN.add_asgi_middleware(
    OpenAPICompletion,
    path="/docs.json",
    describe=lambda: {
        "latent_dim": IN_USE["latent_dim"],
        "api_routes": [api.route for api in AEGAN.apis.values()],
        "upload_routes": [a.route for a in AEGAN.apis.values() if a.input_spec.multipart_fields],
        "image_routes": IMAGE_ONLY,
        **access_in_force(),
    },
)

# Keys, scopes, the request quota and one log line per 4xx, before anything else of ours
# (aegan_serve/auth.py).
AEGAN.add_asgi_middleware(Gate, scopes=SCOPES)

# Size and form-body checks before BentoML parses a request (see aegan_serve/middleware.py).
AEGAN.add_asgi_middleware(
    RequestGuard,
    max_bytes=LIMITS.max_request_bytes,
    max_json_bytes=LIMITS.max_json_bytes,
    max_inflight_bytes=LIMITS.max_inflight_bytes,
    routes={api.route: api.input_spec.multipart_fields for api in AEGAN.apis.values()},
)
