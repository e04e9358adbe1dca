"""A minimal hand-written server doing the service's work: the measuring stick of bench/serve.py.

Starlette + uvicorn, one process, the same ONNX Runtime sessions (aegan_core/runtime.py), the same
upload conversion and PNG/GIF encoding (aegan_core/images.py) and the same latent maths, without
BentoML: no validation models, no request guard, no limits, no batching, no metrics or tracing.
Not product code: it exists so that the service's overhead can be measured against something real.

    python bench/baseline_server.py --port 3100 [--model models/fashion-mnist] [--threads 2]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aegan_core.bundle import DEFAULT_MODEL_DIR, load_bundle
from aegan_core.images import encode_gif, encode_png, load_uploads, make_grid, png_base64, to_uint8
from aegan_core.latents import interpolate, random_seed, sample_prior
from aegan_core.runtime import ModelRuntime


def build_app(model_dir: str, threads: int) -> Starlette:
    bundle = load_bundle(model_dir)
    model = ModelRuntime(bundle, "cpu", threads)
    dim, shape = bundle.latent_dim, bundle.data_shape

    def draw(body: dict) -> tuple[int, np.ndarray]:
        seed = body.get("seed")
        seed = random_seed() if seed is None else int(seed)
        return seed, sample_prior(int(body.get("n", 16)), dim, seed, body.get("truncation", 1.0))

    async def uploads(request: Request) -> np.ndarray:
        form = await request.form()
        blobs = [await part.read() for part in form.getlist("images")]
        return await run_in_threadpool(
            load_uploads, blobs, shape, max_bytes=1 << 30, max_pixels=1 << 30
        )

    async def sample(request: Request) -> Response:
        seed, z = draw(await request.json())
        png = await run_in_threadpool(lambda: encode_png(make_grid(model.generate(z))))
        return Response(png, media_type="image/png", headers={"X-Seed": str(seed)})

    async def generate(request: Request) -> Response:
        seed, z = draw(await request.json())
        images = await run_in_threadpool(
            lambda: [png_base64(t) for t in to_uint8(model.generate(z))]
        )
        return JSONResponse({"seed": seed, "latents": z.tolist(), "images": images})

    async def encode(request: Request) -> Response:
        x = await uploads(request)
        z = await run_in_threadpool(model.encode, x)
        return JSONResponse({"latents": z.tolist()})

    async def reconstruct(request: Request) -> Response:
        x = await uploads(request)

        def work() -> dict:
            z = model.encode(x)
            x_hat = np.clip(model.generate(z), -1.0, 1.0)
            mse = (((x_hat - x) / 2.0) ** 2).reshape(len(x), -1).mean(axis=1)
            return {
                "latents": z.tolist(),
                "images": [png_base64(t) for t in to_uint8(x_hat)],
                "mse": mse.tolist(),
                "psnr": [min(100.0, -10.0 * math.log10(max(e, 1e-30))) for e in mse.tolist()],
            }

        return JSONResponse(await run_in_threadpool(work))

    async def interpolation(request: Request) -> Response:
        body = await request.json()
        ends = np.concatenate(
            [sample_prior(1, dim, s, body.get("truncation", 1.0)) for s in body["seeds"]]
        )

        def work() -> bytes:
            path = interpolate(ends[0], ends[1], body.get("steps", 8), body.get("method", "slerp"))
            return encode_gif(model.generate(path), body.get("frame_ms", 100))

        return Response(await run_in_threadpool(work), media_type="image/gif")

    async def ready(request: Request) -> Response:
        return Response("ok")

    return Starlette(
        routes=[
            Route("/sample", sample, methods=["POST"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/encode", encode, methods=["POST"]),
            Route("/reconstruct", reconstruct, methods=["POST"]),
            Route("/interpolate", interpolation, methods=["POST"]),
            Route("/readyz", ready),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()
    app = build_app(args.model, args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
