"""The AEGAN HTTP service: sample, generate, encode, decode, reconstruct, interpolate, info, and
similar with the pictures of its gallery.

Start it from the repository root with ``bentoml serve`` (the service is named in bentofile.yaml);
``AEGAN_MODEL`` selects the bundle. Settings and limits: aegan_serve/config.py. Endpoint reference
with examples: docs/SERVING.md. Health (/livez, /readyz), /metrics and OpenAPI come from BentoML.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, cast

import bentoml
import numpy as np
from annotated_types import Ge, Le, Len
from bentoml.validators import ContentType, FileSchema
from PIL import Image
from pydantic import BaseModel, Field, Strict
from starlette.datastructures import UploadFile
from starlette.responses import Response

from aegan_core.bundle import load_bundle, resolve_bundle_dir
from aegan_core.errors import RequestError
from aegan_core.gallery import MAX_K, load_gallery
from aegan_core.images import PSNR_CAP_DB
from aegan_core.latents import LATENT_ABS_MAX, MAX_SEED

from .answers import declared, endpoint
from .app import Application
from .auth import AccessSettings, Gate, access_in_force, spend_images
from .config import Settings, SettingsError, cuda_unusable_reason, read_environment
from .middleware import RequestGuard
from .openapi import OpenAPICompletion
from .ui import UI_PATH, ui_app

logger = logging.getLogger("bentoml.aegan_serve")

# Read at import: the limits are part of the API schema below. The model and device are read again
# when a worker starts (AEGAN.__init__).
ENVIRONMENT = read_environment()
SETTINGS = Settings.from_environment(ENVIRONMENT)
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
ACCESS = AccessSettings.from_environment(ENVIRONMENT, workers=SETTINGS.workers)
IN_USE = {"latent_dim": STARTUP_BUNDLE.latent_dim}  # the bundle of this worker


class Upload(PurePosixPath):
    """One uploaded file, held in memory: ``data`` its bytes (the endpoints read nothing else, so
    the path itself is empty, ``.``).

    BentoML's ``Path`` fields first write every upload to a new file in the request's temporary
    directory, a file system round trip per image for uploads this small. Starlette still spools
    a part over 1 MiB to disk.
    """

    data: bytes


class InMemoryFile(FileSchema):
    """A multipart file field (the OpenAPI schema of ``Path``) whose value is an :class:`Upload`."""

    def decode(self, obj: Any) -> Upload:
        if isinstance(obj, UploadFile):
            data = obj.file.read()
        elif isinstance(obj, bytes):
            data = obj
        elif isinstance(obj, Path):  # a local call (e.g. in a test) with a file on disk
            data = obj.read_bytes()
        else:
            raise ValueError("expected an uploaded file")
        upload = Upload()
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
    """Generator G (z -> x) and encoder E (x -> z) of one AEGAN bundle on ONNX Runtime. Each
    endpoint checks its request, spends the caller's image budget and delegates to the
    :class:`~aegan_serve.app.Application` (which knows no HTTP)."""

    def __init__(self) -> None:
        self.app = Application(Settings.from_env())
        IN_USE["latent_dim"] = self.app.bundle.latent_dim  # for the OpenAPI document

    # The image endpoints answer a ready Response with the PNG/GIF bytes they made in a worker
    # thread (the annotations keep the OpenAPI schema and BentoML's client decoding): BentoML would
    # otherwise encode a PIL image on the event loop, or write the bytes to a temporary file.

    @endpoint(scope="generate", images="always")
    async def sample(
        self, n: Count = 16, seed: Seed | None = None, truncation: Truncation = 1.0
    ) -> Image.Image:
        """A PNG grid of ``n`` generated images, ceil(sqrt(n)) per row. A seed makes it repeatable;
        without one a random seed is drawn. The seed used is in the ``X-Seed`` response header."""
        await spend_images(n)
        seed, latents = self.app.draw(n, seed, truncation)
        png = await self.app.grid_png(latents)
        # a ready Response; the annotation keeps the OpenAPI schema (see above)
        return Response(png, media_type="image/png", headers={"X-Seed": str(seed)})  # type: ignore[return-value]

    @endpoint(scope="generate")
    async def generate(
        self, n: Count = 16, seed: Seed | None = None, truncation: Truncation = 1.0
    ) -> Generated:
        """``n`` samples as JSON: the seed, the latents and the images as base64 PNG (image models)
        or the vectors (vector models)."""
        await spend_images(n)
        seed, latents = self.app.draw(n, seed, truncation)
        decoded = await self.app.decode(latents)
        return Generated(seed=seed, latents=latents.tolist(), **decoded)

    @endpoint(scope="encode", images="always")
    async def encode(self, images: Uploads) -> Encoded:
        """One latent per uploaded image, in upload order. Concurrent requests are encoded together
        (cross-request batching, see ``AEGAN_BATCH_SIZE``)."""
        await spend_images(len(images))
        z = await self.app.encode([upload.data for upload in images])
        return Encoded(latents=z.tolist())

    @endpoint(scope="generate")
    async def decode(self, latents: Latents) -> Decoded:
        """Latent vectors -> images as base64 PNG (image models) or vectors (vector models)."""
        z = self.app.latents(latents)
        await spend_images(len(z))
        return Decoded(**await self.app.decode(z))

    @endpoint(scope="encode", images="always")
    async def reconstruct(self, images: Uploads) -> Reconstructed:
        """G(E(x)) for each uploaded image x, with its latent and the per-image error against the
        preprocessed upload."""
        await spend_images(len(images))
        return Reconstructed(**await self.app.reconstruct([upload.data for upload in images]))

    @endpoint(scope="generate", images="always")
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
            ends = await self.app.encode([upload.data for upload in images])
        elif seeds is not None:
            ends = np.concatenate([self.app.draw(1, s, truncation)[1] for s in seeds])
        else:
            ends = self.app.latents(latents or [])
        data = await self.app.animation(ends, steps, method, format, frame_ms)
        # a ready Response; the annotation keeps the OpenAPI schema (see above)
        return Response(data, media_type=f"image/{format}")  # type: ignore[return-value]

    @endpoint(scope="search", gallery=True, images="when uploaded")
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
        if bool(images) == (latents is not None):
            given = "both" if images else "neither"
            raise RequestError(f"give exactly one of: images (uploads) or latents; got {given}")
        if images:
            await spend_images(len(images))
            z = await self.app.encode([upload.data for upload in images])
        else:
            z = self.app.latents(latents or [])
        found = await self.app.similar(z, k)
        return Similar(
            results=[[Neighbour(id=id, distance=d) for id, d in query] for query in found]
        )

    @endpoint(scope="search", gallery=True, images="always", route="/gallery/image")
    async def gallery_image(
        self, id: GalleryId, source: Literal["decoded", "original"] = "decoded"
    ) -> Annotated[Path, ContentType("image/*")]:
        """The picture of gallery image ``id`` (an id /similar answered): ``decoded``, its stored
        latent through the generator (PNG; needs no source files), or ``original``, the file
        itself from ``AEGAN_GALLERY_ROOT`` (404 when that is not set, 400 when the id would
        lead outside it)."""
        if source == "decoded":
            self.app.require_gallery().latent_of(id)  # 404 before the budget is spent
            await spend_images(1)
            # a ready Response; the annotation keeps the OpenAPI schema (see above)
            return Response(self.app.gallery_png(id), media_type="image/png")  # type: ignore[return-value]
        data, media_type = await self.app.gallery_original(id)
        # a ready Response; the annotation keeps the OpenAPI schema (see above)
        return Response(data, media_type=media_type)  # type: ignore[return-value]

    @endpoint(scope=None)
    def info(self) -> dict[str, Any]:
        """The model (name, shapes, prior, metrics measured at export), the execution provider in
        use, the request limits and the encoder batches run so far by this worker."""
        return self.app.info()


# bentoml.service made the class above a Service: this name says so to the type checker.
SERVICE = cast("bentoml.Service[AEGAN]", AEGAN)

# What each endpoint declared (@endpoint): its route, the scope it needs, whether images only.
DECLARED = [declared(api.func) for api in SERVICE.apis.values()]

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
        "image_routes": [d.route for d in DECLARED if d.images != "never"],
        **access_in_force(),
    },
)

# Keys, scopes, the request quota and one log line per 4xx, before anything else of ours
# (aegan_serve/auth.py).
SERVICE.add_asgi_middleware(Gate, scopes={d.route: d.scope for d in DECLARED})

# Size and form-body checks before BentoML parses a request (see aegan_serve/middleware.py).
SERVICE.add_asgi_middleware(
    RequestGuard,
    max_bytes=LIMITS.max_request_bytes,
    max_json_bytes=LIMITS.max_json_bytes,
    max_inflight_bytes=LIMITS.max_inflight_bytes,
    routes={api.route: api.input_spec.multipart_fields for api in SERVICE.apis.values()},
)
