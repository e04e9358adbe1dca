"""Serving settings read from the environment: the model, the device, threads, batching and limits.

Every variable is optional; the defaults below are what a plain ``bentoml serve`` uses. A value that
cannot be parsed stops the server at start-up with a message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from aegan_core.bundle import DEFAULT_MODEL_DIR
from aegan_core.cuda import ALGO_SEARCHES, ARENA_STRATEGIES, CudaOptions, check_in_subprocess
from aegan_core.errors import UserError
from aegan_core.images import UploadLimits
from aegan_core.runtime import available_cpus

DEVICES = ("auto", "cuda", "cpu")
GPU_BATCH_SIZE = 256  # default AEGAN_BATCH_SIZE when CUDA is usable
GPU_MEMORY = "6Gi"  # host memory of a worker on a GPU: CUDA and cuDNN libraries, pinned buffers


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
            # every field of Limits is an int with a default (dataclasses types it as object)
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
    # docs/BENCHMARKS.md), one when CUDA is usable (one CUDA context, batches stay large).
    workers: int
    threads: int  # AEGAN_THREADS: ONNX Runtime intra-op threads per worker (default CPUs/workers)
    # AEGAN_BATCH_SIZE: most images in one encoder run across requests (1: off). Default 64 on the
    # CPU, 256 when CUDA is usable (a GPU runs a larger batch in about the time of a small one).
    batch_size: int
    batch_latency_ms: int  # AEGAN_BATCH_LATENCY_MS: most wait for the encoder or a worker thread
    max_queue: int  # AEGAN_MAX_QUEUE: most images waiting for the encoder; more are refused (429)
    fp16: bool  # AEGAN_FP16: 1 (default) runs the bundle's fp16 graphs on CUDA if present, 0 not
    # The CUDA provider's options (aegan_core/cuda.py, CudaOptions, says what each does):
    cuda_algo_search: str  # AEGAN_CUDA_ALGO_SEARCH: HEURISTIC (default) | EXHAUSTIVE | DEFAULT
    cuda_mem_limit: int  # AEGAN_CUDA_MEM_LIMIT: bytes of GPU memory the arena may hold (0: all)
    cuda_arena: str  # AEGAN_CUDA_ARENA: kSameAsRequested (default) | kNextPowerOfTwo
    cuda_tf32: bool  # AEGAN_CUDA_TF32: 0 (default, fp32 parity) | 1 (TF32 matrix products)
    limits: Limits
    gallery: str = ""  # AEGAN_GALLERY: an `aegan encode` output indexed by `aegan index` (/similar)
    gallery_root: str = ""  # AEGAN_GALLERY_ROOT: folder of the gallery's files (its originals)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        device = environ.get("AEGAN_DEVICE", "auto").strip().lower() or "auto"
        if device not in DEVICES:
            raise SettingsError(f"AEGAN_DEVICE={device!r} must be one of {', '.join(DEVICES)}")
        fp16 = environ.get("AEGAN_FP16", "1").strip()
        if fp16 not in ("0", "1"):
            raise SettingsError(f"AEGAN_FP16={fp16!r} must be 0 or 1")
        cuda = _cuda_settings(environ)
        gpu = device != "cpu" and gpu_usable(cuda_options(cuda))
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
            batch_size=_int(environ, "AEGAN_BATCH_SIZE", GPU_BATCH_SIZE if gpu else 64),
            batch_latency_ms=_int(environ, "AEGAN_BATCH_LATENCY_MS", 5000),
            max_queue=max_queue,
            fp16=fp16 == "1",
            **cuda,
            limits=limits,
            gallery=environ.get("AEGAN_GALLERY", "").strip(),
            gallery_root=environ.get("AEGAN_GALLERY_ROOT", "").strip(),
        )

    def cuda_options(self) -> CudaOptions:
        return cuda_options(
            {f: getattr(self, f) for f in ("cuda_algo_search", "cuda_mem_limit", "cuda_arena")}
            | {"cuda_tf32": self.cuda_tf32}
        )

    def largest_batch(self) -> int:
        """The most rows any graph run of the service takes: an encoder batch (a single request
        may be larger than AEGAN_BATCH_SIZE), or one request's images or frames."""
        limits = self.limits
        return max(self.batch_size, limits.max_images, limits.max_n, limits.max_steps)

    def resources(self, gpu: bool) -> dict[str, Any]:
        """What one worker process declares to BentoML (and a Kubernetes pod requests): on a GPU
        the GPU too, and the host memory the CUDA and cuDNN libraries take (1-2 GB on their own)."""
        if gpu:
            return {"cpu": "2", "memory": GPU_MEMORY, "gpu": 1}
        return {"cpu": "2", "memory": "2Gi"}


def _cuda_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    algo = environ.get("AEGAN_CUDA_ALGO_SEARCH", "").strip().upper() or "HEURISTIC"
    if algo not in ALGO_SEARCHES:
        raise SettingsError(
            f"AEGAN_CUDA_ALGO_SEARCH={algo!r} must be one of {', '.join(ALGO_SEARCHES)}"
        )
    arena = environ.get("AEGAN_CUDA_ARENA", "").strip() or "kSameAsRequested"
    if arena not in ARENA_STRATEGIES:
        raise SettingsError(
            f"AEGAN_CUDA_ARENA={arena!r} must be one of {', '.join(ARENA_STRATEGIES)}"
        )
    tf32 = environ.get("AEGAN_CUDA_TF32", "0").strip()
    if tf32 not in ("0", "1"):
        raise SettingsError(f"AEGAN_CUDA_TF32={tf32!r} must be 0 or 1")
    return {
        "cuda_algo_search": algo,
        "cuda_mem_limit": _int(environ, "AEGAN_CUDA_MEM_LIMIT", 0, minimum=0),
        "cuda_arena": arena,
        "cuda_tf32": tf32 == "1",
    }


def cuda_options(cuda: Mapping[str, Any]) -> CudaOptions:
    return CudaOptions(
        algo_search=cuda["cuda_algo_search"],
        mem_limit=cuda["cuda_mem_limit"],
        arena=cuda["cuda_arena"],
        tf32=cuda["cuda_tf32"],
    )


def cuda_unusable_reason(options: CudaOptions) -> str | None:
    """None when ONNX Runtime's CUDA provider works here with ``options``, else why not (checked
    once per process, in a child process: aegan_core/cuda.py)."""
    return check_in_subprocess(options)


def gpu_usable(options: CudaOptions) -> bool:
    """The worker layout's question: will a worker run on CUDA? Decided by making a CUDA session,
    not by the presence of device files."""
    return cuda_unusable_reason(options) is None
