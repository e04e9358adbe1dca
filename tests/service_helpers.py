"""Helpers for the service tests: start the service in-process or as ``bentoml serve``, and build
uploads."""

from __future__ import annotations

import io
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from process_helpers import stop_group

from aegan_serve.service import AEGAN

with warnings.catch_warnings():  # Starlette 1.x suggests httpx2; httpx is what BentoML ships with
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

REQUEST_TIMEOUT_S = 15
"""BentoML's request timeout in-process: every test request answers well within it."""


@contextmanager
def serve(bundle: Path, **env: str) -> Iterator[TestClient]:
    """The service on ``bundle`` behind Starlette's TestClient (startup and shutdown included).

    Prometheus metrics are off: each app would register them again in this process's registry.
    /metrics is checked end to end (test_service_e2e.py). BentoML's request timeout is
    :data:`REQUEST_TIMEOUT_S` instead of the service's 60 s, so that a request which never
    answers (a bug) fails its test in seconds rather than a minute.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "BENTOML_CONFIG_OPTIONS",
            f"services.{AEGAN.name}.metrics.enabled=false "
            f"services.{AEGAN.name}.traffic.timeout={REQUEST_TIMEOUT_S}",
        )
        mp.setenv("AEGAN_MODEL", str(bundle))
        mp.setenv("AEGAN_DEVICE", "cpu")
        for key, value in env.items():
            mp.setenv(key, value)
        app = lower_case_header_names(AEGAN.to_asgi())
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client


def lower_case_header_names(app: Any) -> Any:
    """``app``, checking that every answer's header names are lower case, as ASGI asks of
    ``http.response.start`` (Starlette's ``Headers`` misses a name in another case): one that is
    not fails the request with a 500."""

    async def checked(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def checking_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = [name for name, _ in message.get("headers", [])]
                assert names == [name.lower() for name in names], names
            await send(message)

        await app(scope, receive, checking_send)

    return checked


BENTOML = Path(sys.executable).with_name("bentoml")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port that was free a moment ago (another process may take it before it is bound again:
    :func:`bentoml_serve` starts over when that happens)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_ready(url: str) -> bool:
    """Whether ``url``/readyz answers 200 now."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


class ServerExited(RuntimeError):
    """``bentoml serve`` ended before it was ready: its exit status and what it printed."""

    def __init__(self, returncode: int, output: str, attempt: int, attempts: int) -> None:
        super().__init__(
            f"bentoml serve exited with {returncode} before it was ready "
            f"(attempt {attempt} of {attempts}):\n{output[-3000:]}"
        )
        self.returncode, self.output = returncode, output


def _ready(url: str, process: subprocess.Popen, log: Path, start: int, timeout: float) -> bool:
    """True once ``process`` has said in ``log`` (after byte ``start``) that it listens on ``url``
    and ``url``/readyz answers 200; False if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if answers_ready(url):
            ours = f"listening on {url}".encode() in log.read_bytes()[start:]
            if ours and process.poll() is None:
                return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} was not ready within {timeout:.0f} s")
        time.sleep(0.5)
    return False


@contextmanager
def bentoml_serve(
    *args: str, env: dict[str, str], log: Path, ready_timeout: float = 120.0, attempts: int = 3
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``bentoml serve ARGS`` on a free port of 127.0.0.1, run from the repository root in a
    session of its own; yields its base URL and process once it is ready, and stops it and its
    workers at the end. Its output is appended to ``log``.

    A port found free can be taken (by any connection on the machine) in the seconds before the
    server binds it; the server then exits with "Address already in use" and starts again on
    another port, up to ``attempts`` times. Any other exit before it is ready raises
    :class:`ServerExited`.
    """
    for attempt in range(1, attempts + 1):
        port = free_port()
        start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [str(BENTOML), "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            ready = _ready(url, process, log, start, ready_timeout)
        except BaseException:
            stop_group(process)
            raise
        if ready:
            break
        stop_group(process)
        said = log.read_bytes()[start:].decode(errors="replace")
        if "Address already in use" not in said or attempt == attempts:
            raise ServerExited(process.returncode, said, attempt, attempts)
    try:
        yield url, process
    finally:
        stop_group(process)


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


def tiny_model_info(bundle: Path) -> dict[str, Any]:
    """What /info says of the model of the test bundle (tests/bundle_factory.py)."""
    return {
        "name": "tiny-test",
        "kind": "image",
        "data_shape": [1, 28, 28],
        "latent_dim": 32,
        "latent_prior": "normal",
        "path": str(bundle),
        "metrics": {"recon_mse": 0.01},
        "directions": None,  # the bundle has none (tests/test_directions.py)
    }
