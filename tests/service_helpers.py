"""Helpers for the service tests: start the service in-process and build uploads."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from aegan_serve.service import AEGAN

with warnings.catch_warnings():  # Starlette 1.x suggests httpx2; httpx is what BentoML ships with
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@contextmanager
def serve(bundle: Path, **env: str) -> Iterator[TestClient]:
    """The service on ``bundle`` behind Starlette's TestClient (startup and shutdown included).

    Prometheus metrics are off: each app would register them again in this process's registry.
    /metrics is checked end to end (test_service_e2e.py).
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENTOML_CONFIG_OPTIONS", f"services.{AEGAN.name}.metrics.enabled=false")
        mp.setenv("AEGAN_MODEL", str(bundle))
        mp.setenv("AEGAN_DEVICE", "cpu")
        for key, value in env.items():
            mp.setenv(key, value)
        with TestClient(AEGAN.to_asgi(), raise_server_exceptions=False) as client:
            yield client


def error_of(response: Any, status: int) -> str:
    """Check an error answer's status and ``{"error": message}`` body; return the message."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    return body["error"]


def image_bytes(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def gradient(size: tuple[int, int] = (28, 28), mode: str = "L") -> Image.Image:
    """A deterministic test picture that is not symmetric (so rotations show)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    grey = ((x * 255) // max(1, w - 1) * 0.7 + (y * 255) // max(1, h - 1) * 0.3).astype(np.uint8)
    image = Image.fromarray(grey, mode="L")
    return image if mode == "L" else image.convert(mode)


def files(*blobs: bytes, field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart file parts for TestClient (``files=``)."""
    return [
        (field, (f"upload{i}.bin", blob, "application/octet-stream"))
        for i, blob in enumerate(blobs)
    ]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` grey pixels but holds no pixel data: opening it
    works, decoding it fails, so it shows whether a size check happens before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


def decode_png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)
