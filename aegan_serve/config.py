"""Serving settings read from the environment: the model, the device, threads, batching and limits.

Every variable is optional; the defaults below are what a plain ``bentoml serve`` uses. A value that
cannot be parsed stops the server at start-up with a message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from aegan_core.bundle import DEFAULT_MODEL_DIR
from aegan_core.errors import UserError
from aegan_core.images import UploadLimits
from aegan_core.runtime import available_cpus, gpu_visible

DEVICES = ("auto", "cuda", "cpu")


class SettingsError(UserError, ValueError):
    """An environment variable holds a value the server cannot use."""


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Limits:
    """Per-request limits. Each violation is answered with a 4xx that names the limit."""

    max_images: int = 64  # AEGAN_MAX_IMAGES: uploaded images per request (/encode, /reconstruct)
    max_upload_bytes: int = UploadLimits.max_upload_bytes  # AEGAN_MAX_UPLOAD_BYTES: bytes per file
    max_pixels: int = UploadLimits.max_pixels  # AEGAN_MAX_PIXELS: width x height of one upload
    max_n: int = 64  # AEGAN_MAX_N: images or vectors made per request (/sample, /generate, /decode)
    max_steps: int = 64  # AEGAN_MAX_STEPS: frames per /interpolate answer
    max_request_bytes: int = 64 << 20  # AEGAN_MAX_REQUEST_BYTES: whole body of a form (uploads)
    max_json_bytes: int = 1 << 20  # AEGAN_MAX_JSON_BYTES: whole body of any other request (JSON)
    # AEGAN_MAX_INFLIGHT_BYTES: request bodies one worker holds at once; more load is refused (429)
    max_inflight_bytes: int = 256 << 20

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        values = {
            f.name: _int(environ, f"AEGAN_{f.name.upper()}", f.default)  # type: ignore[arg-type]
            for f in fields(cls)
        }
        if values["max_inflight_bytes"] < values["max_request_bytes"]:
            raise SettingsError(
                "AEGAN_MAX_INFLIGHT_BYTES must be at least AEGAN_MAX_REQUEST_BYTES "
                f"({values['max_request_bytes']}): one request must always fit"
            )
        if values["max_steps"] < 2:
            raise SettingsError("AEGAN_MAX_STEPS must be at least 2 (the two end points)")
        return cls(**values)

    def env_name(self, field: str) -> str:
        """The environment variable that sets ``field`` (for error messages)."""
        return f"AEGAN_{field.upper()}"


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from the environment."""

    model: str  # AEGAN_MODEL: bundle directory, or a BentoML model tag (``bentoml:NAME[:VERSION]``)
    device: str  # AEGAN_DEVICE: auto (CUDA when it works, else CPU) | cuda (required) | cpu
    # AEGAN_WORKERS: server worker processes, each with its own ONNX Runtime sessions. Default: one
    # per CPU on the CPU (measured best for small requests, equal for large ones:
    # docs/BENCHMARKS.md), one when a GPU is visible (one CUDA context, batches stay large).
    workers: int
    threads: int  # AEGAN_THREADS: ONNX Runtime intra-op threads per worker (default CPUs/workers)
    batch_size: int  # AEGAN_BATCH_SIZE: most images in one encoder run across requests (1: off)
    batch_latency_ms: int  # AEGAN_BATCH_LATENCY_MS: most wait for the encoder or a worker thread
    max_queue: int  # AEGAN_MAX_QUEUE: most images waiting for the encoder; more are refused (429)
    fp16: bool  # AEGAN_FP16: 1 (default) runs the bundle's fp16 graphs on CUDA if present, 0 not
    limits: Limits

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        device = environ.get("AEGAN_DEVICE", "auto").strip().lower() or "auto"
        if device not in DEVICES:
            raise SettingsError(f"AEGAN_DEVICE={device!r} must be one of {', '.join(DEVICES)}")
        fp16 = environ.get("AEGAN_FP16", "1").strip()
        if fp16 not in ("0", "1"):
            raise SettingsError(f"AEGAN_FP16={fp16!r} must be 0 or 1")
        gpu = device != "cpu" and gpu_visible()
        workers = _int(environ, "AEGAN_WORKERS", 1 if gpu else available_cpus())
        limits = Limits.from_env(environ)
        max_queue = _int(environ, "AEGAN_MAX_QUEUE", 1024)
        if max_queue < limits.max_images:
            raise SettingsError(
                f"AEGAN_MAX_QUEUE={max_queue} must be at least AEGAN_MAX_IMAGES={limits.max_images}"
                " (one request's images always fit in the queue)"
            )
        return cls(
            model=environ.get("AEGAN_MODEL", "").strip() or str(DEFAULT_MODEL_DIR),
            device=device,
            workers=workers,
            threads=_int(environ, "AEGAN_THREADS", max(1, available_cpus() // workers)),
            batch_size=_int(environ, "AEGAN_BATCH_SIZE", 64),
            batch_latency_ms=_int(environ, "AEGAN_BATCH_LATENCY_MS", 5000),
            max_queue=max_queue,
            fp16=fp16 == "1",
            limits=limits,
        )
