"""The AEGAN HTTP service: sample, generate, encode, decode, reconstruct, interpolate, info, and
similar with the pictures of its gallery.

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
from typing import Annotated, Any, Literal, TypeVar, cast

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
from aegan_core.gallery import MAX_K, Gallery, GalleryNotFound, load_gallery
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
from .config import Settings, SettingsError, available_cpus, cuda_unusable_reason
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
# Whether a worker will run on CUDA, decided by making a CUDA session (in a child process, once;
# aegan_core/cuda.py): the worker layout, the declared resources and AEGAN_DEVICE=cuda follow it.
CUDA_REASON = "AEGAN_DEVICE=cpu" if SETTINGS.device == "cpu" else None
if SETTINGS.device != "cpu":
    CUDA_REASON = cuda_unusable_reason(SETTINGS.cuda_options())
    if SETTINGS.device == "cuda" and CUDA_REASON is not None:
        raise SettingsError(f"AEGAN_DEVICE=cuda but CUDA is not usable here: {CUDA_REASON}")
# A gallery that is missing, altered or encoded by another bundle stops it the same way.
if SETTINGS.gallery:
    load_gallery(SETTINGS.gallery, STARTUP_BUNDLE, open_index=False)
if SETTINGS.gallery_root and not Path(SETTINGS.gallery_root).is_dir():
    raise SettingsError(f"AEGAN_GALLERY_ROOT={SETTINGS.gallery_root!r} is not a directory")
# API keys and quotas (aegan_serve/auth.py): a keys file or quota setting that cannot be used stops
# the server here too.
ACCESS = AccessSettings.from_env(workers=SETTINGS.workers)
INLINE_MAX_IMAGES = 1  # requests making at most this many images run on the event loop
INLINE_MAX_SEARCH_ROWS = 10_000  # searches of at most this many queries x gallery latents too
# 422 on a vector model (/similar: when given images)
IMAGE_ONLY = ("/sample", "/encode", "/reconstruct", "/interpolate", "/similar", "/gallery/image")
# Media types of the originals /gallery/image answers, by suffix (the formats aegan encode reads).
ORIGINAL_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}
IN_USE = {"latent_dim": STARTUP_BUNDLE.latent_dim}  # the bundle of this worker
# The scope a key needs for each endpoint (None: any valid key); aegan_serve/apikeys.py lists them.
SCOPES = {
    "/sample": "generate",
    "/generate": "generate",
    "/decode": "generate",
    "/interpolate": "generate",
    "/encode": "encode",
    "/reconstruct": "encode",
    "/similar": "search",
    "/gallery/image": "search",
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
Neighbours = Annotated[int, Strict(), Ge(1), Le(MAX_K)]
GalleryId = Annotated[str, Len(1, 4096)]
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


class Neighbour(BaseModel):
    id: str = Field(description="the gallery image's id: its path in the encoded collection")
    distance: float = Field(description="Euclidean distance between the two latents")


class Similar(BaseModel):
    results: list[list[Neighbour]] = Field(
        description="one list per query, in order, nearest first (at most k, and at most the "
        "gallery's size)"
    )


@bentoml.service(
    name="aegan",
    workers=SETTINGS.workers,
    resources=SETTINGS.resources(gpu=CUDA_REASON is None),
    traffic={"timeout": 60},
)
class AEGAN:
    """Generator G (z -> x) and encoder E (x -> z) of one AEGAN bundle on ONNX Runtime."""

    def __init__(self) -> None:
        settings = Settings.from_env()
        self.bundle = load_bundle(resolve_bundle_dir(settings.model))  # verifies SHA-256
        IN_USE["latent_dim"] = self.bundle.latent_dim  # for the OpenAPI document
        fallbacks = cuda_fallback_counter()  # at /metrics from the start, 0 until a fallback
        self.model = ModelRuntime(
            self.bundle,
            settings.device,
            settings.threads,
            fp16=settings.fp16,
            cuda=settings.cuda_options(),
            max_rows=settings.largest_batch(),  # CUDA warms up every batch size it will run
            on_fallback=lambda reason: fallbacks.inc(),
        )
        self.prior = prior_name(self.bundle.spec.latent_prior)
        self.gallery: Gallery | None = None
        if settings.gallery:  # checked whole at start-up; here only the sizes of its files
            self.gallery = load_gallery(
                settings.gallery, self.bundle, verify=False, threads=settings.threads
            )
        self.gallery_root = Path(settings.gallery_root).resolve() if settings.gallery_root else None
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
            "model %r from %s: %s %s, latent_dim %d; ONNX Runtime %s (%s, %d threads)%s",
            self.bundle.name,
            self.bundle.path,
            self.bundle.kind,
            self.bundle.data_shape,
            self.bundle.latent_dim,
            self.model.provider,
            self.model.precision,
            self.model.threads,
            f"; CUDA not used: {self.model.cuda_reason}" if self.model.cuda_reason else "",
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
        # a ready Response; the annotation keeps the OpenAPI schema (see above)
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
        # a ready Response; the annotation keeps the OpenAPI schema (see above)
        return Response(data, media_type=f"image/{format}")  # type: ignore[return-value]

    @bentoml.api
    @answers_client_errors
    async def similar(
        self,
        images: Annotated[list[UploadedFile], Len(0, LIMITS.max_images)] = Field(
            default_factory=list
        ),
        latents: Annotated[list[list[Coordinate]] | None, Len(1, LIMITS.max_n)] = None,
        k: Neighbours = 10,
    ) -> Similar:
        """The ``k`` nearest gallery images (``AEGAN_GALLERY``) to each query, given as exactly
        one of: uploaded images (encoded as /encode does) or latents. Distances are Euclidean
        between latents. A neighbour's picture: /gallery/image with its id. 404 when the server
        has no gallery."""
        gallery = self._require_gallery()
        if bool(images) == (latents is not None):
            given = "both" if images else "neither"
            raise RequestError(f"give exactly one of: images (uploads) or latents; got {given}")
        if images:
            self._require_images("similar")
            await spend_images(len(images))
            z = await self.encoder(await self._load(images))
        else:
            z = check_latents(latents or [], self.bundle.latent_dim, "latents")
        # A small gallery is searched on the event loop; a larger one in the worker pool, so that
        # a scan of up to EXACT_MAX_ROWS latents does not hold up the other requests.
        if len(z) * gallery.size <= INLINE_MAX_SEARCH_ROWS:
            distances, rows = gallery.search(z, k)
        else:
            distances, rows = await self._in_pool(gallery.search, z, k)
        return Similar(
            results=[
                [Neighbour(id=gallery.ids[r], distance=d) for d, r in zip(ds, rs, strict=True)]
                for ds, rs in zip(distances.tolist(), rows.tolist(), strict=True)
            ]
        )

    @bentoml.api(route="/gallery/image")
    @answers_client_errors
    async def gallery_image(
        self, id: GalleryId, source: Literal["decoded", "original"] = "decoded"
    ) -> Annotated[Path, ContentType("image/*")]:
        """The picture of gallery image ``id`` (an id /similar answered): ``decoded``, its stored
        latent through the generator (PNG; needs no source files), or ``original``, the file
        itself from ``AEGAN_GALLERY_ROOT`` (404 when that is not set, 400 when the id would
        lead outside it)."""
        gallery = self._require_gallery()
        self._require_images("gallery/image")
        z = gallery.latent_of(id)[None]
        if source == "decoded":
            await spend_images(1)
            png = self._decode_png(z)
            # a ready Response; the annotation keeps the OpenAPI schema (see above)
            return Response(png, media_type="image/png")  # type: ignore[return-value]
        path = self._original(id)
        data = await self._in_pool(path.read_bytes)
        media_type = ORIGINAL_TYPES.get(path.suffix.lower(), "application/octet-stream")
        # a ready Response; the annotation keeps the OpenAPI schema (see above)
        return Response(data, media_type=media_type)  # type: ignore[return-value]

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
                "cuda_unused_reason": self.model.cuda_reason,  # null on CUDA
                "cuda_fallbacks": self.model.fallbacks,
                "fp16_max_abs_error": self.model.fp16_error,  # fp16 on CUDA against fp32 CPU
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
            # The gallery /similar searches (AEGAN_GALLERY); null when there is none.
            "gallery": self.gallery
            and {**self.gallery.describe(), "originals": self.gallery_root is not None},
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

    def _require_gallery(self) -> Gallery:
        if self.gallery is None:
            raise GalleryNotFound(
                "this server has no gallery: index an `aegan encode` output with `aegan index "
                "DEST` and start the server with AEGAN_GALLERY=DEST"
            )
        return self.gallery

    def _decode_png(self, z: np.ndarray) -> bytes:
        return encode_png(to_uint8(self.model.generate(z))[0])

    def _original(self, id: str) -> Path:
        """The file of gallery image ``id`` under ``AEGAN_GALLERY_ROOT``; never one outside it."""
        if self.gallery_root is None:
            raise GalleryNotFound(
                "the originals are not served (AEGAN_GALLERY_ROOT is not set); ask for "
                "source=decoded"
            )
        try:
            path = (self.gallery_root / id).resolve()
        except (ValueError, OSError) as exc:  # a NUL byte, a link loop
            raise RequestError(f"id {id[:200]!r} is not a usable path ({exc})") from None
        if not path.is_relative_to(self.gallery_root):
            raise RequestError(
                f"id {id[:200]!r} leads outside AEGAN_GALLERY_ROOT; its original is not served"
            )
        if not path.is_file():
            raise GalleryNotFound(f"id {id[:200]!r} has no file under AEGAN_GALLERY_ROOT")
        return path

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
            # an image model here (_require_images): data_shape is (C, H, W)
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
_CUDA_FALLBACKS: Any = None


def cuda_fallback_counter() -> Any:
    """The Prometheus counter of times a worker in auto mode left CUDA for the CPU (at start-up
    with a GPU present, or after a failed run); the reason is in the log and /info."""
    global _CUDA_FALLBACKS
    if _CUDA_FALLBACKS is None:
        from prometheus_client import Counter

        _CUDA_FALLBACKS = Counter(
            "aegan_cuda_fallbacks", "Times a worker left CUDA for the CPU provider"
        )
    return _CUDA_FALLBACKS


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


# bentoml.service made the class above a Service: this name says so to the type checker.
SERVICE = cast("bentoml.Service[AEGAN]", AEGAN)

for _api in SERVICE.apis.values():  # OpenAPI shows these docstrings: drop their source indentation
    _api.doc = inspect.cleandoc(_api.doc or "")

# The latent explorer page: static files that call the endpoints above (aegan_serve/ui.py).
SERVICE.mount_asgi_app(ui_app(), path=UI_PATH, name="ui")

# /docs.json as the service behaves: every error answer, latent lengths (aegan_serve/openapi.py).
SERVICE.add_asgi_middleware(
    OpenAPICompletion,
    path="/docs.json",
    describe=lambda: {
        "latent_dim": IN_USE["latent_dim"],
        "api_routes": [api.route for api in SERVICE.apis.values()],
        "upload_routes": [a.route for a in SERVICE.apis.values() if a.input_spec.multipart_fields],
        "image_routes": IMAGE_ONLY,
        **access_in_force(),
    },
)

# Keys, scopes, the request quota and one log line per 4xx, before anything else of ours
# (aegan_serve/auth.py).
SERVICE.add_asgi_middleware(Gate, scopes=SCOPES)

# Size and form-body checks before BentoML parses a request (see aegan_serve/middleware.py).
SERVICE.add_asgi_middleware(
    RequestGuard,
    max_bytes=LIMITS.max_request_bytes,
    max_json_bytes=LIMITS.max_json_bytes,
    max_inflight_bytes=LIMITS.max_inflight_bytes,
    routes={api.route: api.input_spec.multipart_fields for api in SERVICE.apis.values()},
)
