"""The pictures of a bundle in docs/: samples, reconstructions and an interpolation, each asked of
the service itself (in-process, on the CPU), so they show what a client of the shipped model gets.

    python scripts/model_pictures.py [--model models/fashion-mnist] [--out docs]

- ``samples.png``: ``POST /sample {"n": 64, "seed": 0}``;
- ``reconstructions.png``: the first 32 Fashion-MNIST test images (odd rows) above their
  reconstructions from ``POST /reconstruct`` (even rows), 8 per row;
- ``interpolation.png``: ``POST /interpolate {"seeds": [1, 2], "steps": 10, "format": "png"}``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _checked(response):  # noqa: ANN001, ANN202 (an httpx response)
    if response.status_code != 200:
        raise SystemExit(f"{response.request.url.path}: {response.status_code} {response.text}")
    return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "fashion-mnist"))
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNG files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    os.environ["AEGAN_MODEL"] = str(Path(args.model).resolve())
    os.environ["AEGAN_DEVICE"] = "cpu"
    from aegan_core.images import make_grid, to_pil
    from aegan_serve.service import AEGAN
    from training.config import DataConfig, fashion_mnist_dir
    from training.data import load_fashion_mnist_arrays

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    test_images, _ = load_fashion_mnist_arrays(fashion_mnist_dir(DataConfig()), "test")
    real = np.asarray(test_images[:32])
    with TestClient(AEGAN.to_asgi()) as client:
        sample = _checked(client.post("/sample", json={"n": 64, "seed": 0}))
        (out / "samples.png").write_bytes(sample.content)

        files = [("images", (f"test-{i}.png", _png(x), "image/png")) for i, x in enumerate(real)]
        answer = _checked(client.post("/reconstruct", files=files)).json()
        recon = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in answer["images"]]
        rows = []
        for start in range(0, len(real), 8):  # a row of images, then a row of reconstructions
            rows += list(real[start : start + 8]) + recon[start : start + 8]
        tiles = np.stack(rows).astype(np.float32)[:, None] / 127.5 - 1.0
        to_pil(make_grid(tiles, nrow=8)).save(out / "reconstructions.png")

        body = {"seeds": [1, 2], "steps": 10, "format": "png"}
        strip = _checked(client.post("/interpolate", json=body))
        (out / "interpolation.png").write_bytes(strip.content)
    for name in ("samples.png", "reconstructions.png", "interpolation.png"):
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
