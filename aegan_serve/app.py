"""The application behind the endpoints, without HTTP: one bundle on ONNX Runtime, the encoder's
cross-request batcher, the worker pool and the gallery.

Each method takes plain values (numbers, upload bytes, latents) and answers plain values or
encoded pictures; it raises the client errors of :mod:`aegan_core.errors` for what a caller got
wrong. aegan_serve/service.py declares the endpoints (types, limits, quotas) and delegates here;
tests call it directly, without a server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from aegan_core.bundle import load_bundle, resolve_bundle_dir
from aegan_core.errors import Overloaded, RequestError, WrongModelKind
from aegan_core.gallery import Gallery, GalleryNotFound, load_gallery
from aegan_core.images import (
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
from aegan_core.latents import check_latents, interpolate, prior_name, random_seed, sample_prior
from aegan_core.runtime import ModelRuntime, available_cpus

from . import __version__
from .batching import Batcher
from .config import Settings, env_var

logger = logging.getLogger("bentoml.aegan_serve")

INLINE_MAX_IMAGES = 1  # requests making at most this many images run on the event loop
INLINE_MAX_SEARCH_ROWS = 10_000  # searches of at most this many queries x gallery latents too
# Media types of the originals a gallery serves, by suffix (the formats aegan encode reads).
ORIGINAL_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}
T = TypeVar("T")


class Application:
    """Generator G (z -> x) and encoder E (x -> z) of one AEGAN bundle, and what the endpoints do
    with them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bundle = load_bundle(resolve_bundle_dir(settings.model))  # verifies SHA-256
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
            max_wait_s=self.max_wait_s,
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

    # --- what the endpoints do ------------------------------------------------------------------

    def require_images(self, route: str) -> None:
        """A :class:`WrongModelKind` (422) unless the model makes images."""
        if self.bundle.kind != "image":
            raise WrongModelKind(
                f"model {self.bundle.name!r} is a vector model (data shape "
                f"{list(self.bundle.data_shape)}), and {route} works with images only; "
                "/generate and /decode return its vectors"
            )

    def latents(self, values: Sequence[Sequence[float]]) -> np.ndarray:
        """Caller-given latents as a (n, latent_dim) array, or a :class:`RequestError`."""
        return check_latents(values, self.bundle.latent_dim, "latents")

    def draw(self, n: int, seed: int | None, truncation: float) -> tuple[int, np.ndarray]:
        """``n`` prior draws of ``seed`` (a random seed when None), and the seed."""
        seed = random_seed() if seed is None else seed
        return seed, sample_prior(n, self.bundle.latent_dim, seed, truncation, self.prior)

    async def grid_png(self, latents: np.ndarray) -> bytes:
        """A PNG grid of the generated images, ceil(sqrt(n)) per row."""
        return await self._compute(
            len(latents), lambda: encode_png(make_grid(self.model.generate(latents)))
        )

    async def decode(self, latents: np.ndarray) -> dict[str, list[Any]]:
        """``{"images": base64 PNGs}`` (image models) or ``{"vectors": data}`` (vector models)."""

        def decoded() -> dict[str, list[Any]]:
            data = self.model.generate(latents)
            if self.bundle.kind == "image":
                return {"images": [png_base64(tile) for tile in to_uint8(data)]}
            return {"vectors": data.tolist()}

        return await self._compute(len(latents), decoded)

    async def encode(self, uploads: Sequence[bytes]) -> np.ndarray:
        """The latents of uploaded image files, in order (batched with other requests)."""
        return await self.encoder(await self.load(uploads))

    async def reconstruct(self, uploads: Sequence[bytes]) -> dict[str, list[Any]]:
        """G(E(x)) of each upload x: its latent, the reconstruction as base64 PNG, and the MSE and
        PSNR against the preprocessed upload (pixels in [0, 1])."""
        x = await self.load(uploads)
        z = await self.encoder(x)

        def reconstructed() -> dict[str, list[Any]]:
            x_hat = self.model.generate(z)
            unit, unit_hat = to_unit(x), to_unit(x_hat)
            return {
                "latents": z.tolist(),
                "images": [png_base64(tile) for tile in to_uint8(x_hat)],
                "mse": per_sample_mse(unit, unit_hat).tolist(),
                "psnr": psnr(unit, unit_hat).tolist(),
            }

        return await self._compute(len(x), reconstructed)

    async def animation(
        self, ends: np.ndarray, steps: int, method: str, format: str, frame_ms: int
    ) -> bytes:
        """``steps`` frames between the two latents ``ends``: an animated GIF or a PNG strip."""

        def frames() -> bytes:
            made = self.model.generate(interpolate(ends[0], ends[1], steps, method))
            if format == "gif":
                return encode_gif(made, frame_ms)
            return encode_png(make_grid(made, nrow=steps))

        return await self._compute(steps, frames)

    def require_gallery(self) -> Gallery:
        """The gallery, or a :class:`GalleryNotFound` (404) saying how to get one."""
        if self.gallery is None:
            raise GalleryNotFound(
                "this server has no gallery: index an `aegan encode` output with `aegan index "
                "DEST` and start the server with AEGAN_GALLERY=DEST"
            )
        return self.gallery

    async def similar(self, z: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` nearest gallery images to each latent: (id, distance), nearest first."""
        gallery = self.require_gallery()
        # A small gallery is searched on the event loop; a larger one in the worker pool, so that
        # a scan of up to EXACT_MAX_ROWS latents does not hold up the other requests.
        if len(z) * gallery.size <= INLINE_MAX_SEARCH_ROWS:
            distances, rows = gallery.search(z, k)
        else:
            distances, rows = await self._in_pool(gallery.search, z, k)
        return [
            [(gallery.ids[r], d) for d, r in zip(ds, rs, strict=True)]
            for ds, rs in zip(distances.tolist(), rows.tolist(), strict=True)
        ]

    def gallery_png(self, id: str) -> bytes:
        """Gallery image ``id``'s stored latent through the generator, as PNG."""
        z = self.require_gallery().latent_of(id)[None]
        return encode_png(to_uint8(self.model.generate(z))[0])

    async def gallery_original(self, id: str) -> tuple[bytes, str]:
        """Gallery image ``id``'s file under ``AEGAN_GALLERY_ROOT`` and its media type; never a
        file outside that folder."""
        self.require_gallery().latent_of(id)  # 404 for an id the gallery does not hold
        if self.gallery_root is None:
            raise GalleryNotFound(
                "the originals are not served (AEGAN_GALLERY_ROOT is not set); ask for "
                "source=decoded"
            )
        # Not Path.resolve(): before Python 3.13 it raises RuntimeError at a link loop. realpath
        # leaves a loop unresolved, and is_file() below is False for it. (A gallery id holds no
        # NUL byte: the encoding job cannot look up such a path, and stops.)
        path = Path(os.path.realpath(self.gallery_root / id))
        if not path.is_relative_to(self.gallery_root):
            raise RequestError(
                f"id {id[:200]!r} leads outside AEGAN_GALLERY_ROOT; its original is not served"
            )
        if not path.is_file():
            raise GalleryNotFound(f"id {id[:200]!r} has no file under AEGAN_GALLERY_ROOT")
        data = await self._in_pool(path.read_bytes)
        return data, ORIGINAL_TYPES.get(path.suffix.lower(), "application/octet-stream")

    def info(self) -> dict[str, Any]:
        """The model, the runtime, the limits, the encoder batches run so far, the gallery."""
        settings, limits, sizes = self.settings, self.settings.limits, self.encoder.sizes
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
                "workers": settings.workers,
                "cuda_unused_reason": self.model.cuda_reason,  # null on CUDA
                "cuda_fallbacks": self.model.fallbacks,
                "fp16_max_abs_error": self.model.fp16_error,  # fp16 on CUDA against fp32 CPU
            },
            "limits": {
                **{env_var(k): v for k, v in asdict(limits).items()},
                "AEGAN_BATCH_SIZE": settings.batch_size,
                "AEGAN_BATCH_LATENCY_MS": settings.batch_latency_ms,
                "AEGAN_MAX_QUEUE": settings.max_queue,
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

    # --- where the work runs --------------------------------------------------------------------

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

    async def load(self, uploads: Sequence[bytes]) -> np.ndarray:
        """Decode and convert uploads in the worker pool, off the event loop; the uploads of one
        request are split over the pool's threads (Pillow's codecs release the GIL)."""
        self.require_images("decoding uploads")
        size = math.ceil(len(uploads) / self.pool_size)
        parts = await asyncio.gather(
            *(
                self._in_pool(self._convert, uploads[i : i + size], i)
                for i in range(0, len(uploads), size)
            )
        )
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _convert(self, uploads: Sequence[bytes], first_index: int) -> np.ndarray:
        # load() checked the model makes images, and so its data_shape is (C, H, W) (ModelRuntime)
        channels, height, width = self.bundle.data_shape
        return load_uploads(
            list(uploads),
            (channels, height, width),
            max_bytes=self.settings.limits.max_upload_bytes,
            max_pixels=self.settings.limits.max_pixels,
            first_index=first_index,
        )


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
