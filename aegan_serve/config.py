"""Serving settings read from the environment: the model, the device, threads, batching, limits,
keys and quotas.

:class:`Environment` declares every ``AEGAN_*`` variable once (pydantic-settings): its type, its
default and its bounds. Every variable is optional; the defaults are what a plain ``bentoml serve``
uses. A value that cannot be parsed or is out of bounds stops the server at start-up with a message
naming the variable (:func:`read_environment`). :class:`Settings` and :class:`Limits` are what the
service uses, with the defaults that depend on the machine filled in and the checks across
variables made; keys and quotas build theirs from the same :class:`Environment` (auth.py and
quotas.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from aegan_core.bundle import DEFAULT_MODEL_DIR
from aegan_core.cuda import AlgoSearch, ArenaStrategy, CudaOptions, check_in_subprocess
from aegan_core.errors import UserError
from aegan_core.images import UploadLimits
from aegan_core.runtime import available_cpus

PREFIX = "AEGAN_"
GPU_BATCH_SIZE = 256  # default AEGAN_BATCH_SIZE when CUDA is usable
GPU_MEMORY = "6Gi"  # host memory of a worker on a GPU: CUDA and cuDNN libraries, pinned buffers
STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix")


class SettingsError(UserError, ValueError):
    """An environment variable holds a value the server cannot use."""


def env_var(field: str) -> str:
    """The environment variable of an :class:`Environment` field (for messages)."""
    return PREFIX + field.upper()


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip() not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return str(value).strip() == "1"


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def redacted(url: str) -> str:
    """``url`` without its password (a Redis URL may hold one)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":***@", 1) if password else url


def _storage_url(url: str) -> str:
    """Refuse a quota storage URL that cannot work, naming the problem (no connection is made)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"is not a URL: {exc}") from None
    if parts.scheme not in STORAGE_SCHEMES:
        raise ValueError(f"must start with {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
    if parts.scheme.startswith("redis") and not (parts.hostname or parts.path):
        raise ValueError("names no Redis host")
    database = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
        raise ValueError(f"is not usable: the database {database!r} must be a number")
    return url


Flag = Annotated[bool, BeforeValidator(_flag)]  # 0 or 1
StorageUrl = Annotated[str, AfterValidator(_storage_url)]


class Environment(BaseSettings):
    """Every ``AEGAN_*`` variable the service reads (the field's name in capitals after AEGAN_).
    An empty variable is the same as an unset one."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_ignore_empty=True, str_strip_whitespace=True, frozen=True
    )

    # The model: a bundle directory, or a BentoML model tag (``bentoml:NAME[:VERSION]``).
    model: str = str(DEFAULT_MODEL_DIR)
    # auto (CUDA when it works, else CPU) | cuda (required) | cpu
    device: Annotated[Literal["auto", "cuda", "cpu"], BeforeValidator(_lower)] = "auto"
    # Server worker processes, each with its own ONNX Runtime sessions. Default: one per CPU on
    # the CPU (measured best for small requests, equal for large ones: docs/BENCHMARKS.md), one
    # when CUDA is usable (one CUDA context, batches stay large).
    workers: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)  # ONNX Runtime intra-op threads (default CPUs/workers)
    # Most images in one encoder run across requests (1: off). Default 64 on the CPU, 256 when
    # CUDA is usable (a GPU runs a larger batch in about the time of a small one).
    batch_size: int | None = Field(None, ge=1)
    batch_latency_ms: int = Field(5000, ge=1)  # most wait for the encoder or a worker thread
    max_queue: int = Field(1024, ge=1)  # most images waiting for the encoder; more: 429
    fp16: Flag = True  # 1 runs the bundle's fp16 graphs on CUDA if present, 0 not
    # The CUDA provider's options (aegan_core/cuda.py, CudaOptions, says what each does):
    cuda_algo_search: Annotated[AlgoSearch, BeforeValidator(_upper)] = "HEURISTIC"
    cuda_mem_limit: int = Field(0, ge=0)  # bytes of GPU memory the arena may hold (0: all)
    cuda_arena: Annotated[ArenaStrategy, BeforeValidator(_strip)] = "kSameAsRequested"
    cuda_tf32: Flag = False  # 0: fp32 parity | 1: TF32 matrix products
    # Per-request limits (Limits); each violation is answered with a 4xx that names the limit.
    max_images: int = Field(64, ge=1)  # uploaded images per request (/encode, /reconstruct)
    max_upload_bytes: int = Field(UploadLimits.max_upload_bytes, ge=1)  # bytes per file
    max_pixels: int = Field(UploadLimits.max_pixels, ge=1)  # width x height of one upload
    max_n: int = Field(64, ge=1)  # images or vectors made per request (/sample, /generate, ...)
    max_steps: int = Field(64, ge=2)  # frames per /interpolate answer (at least the two ends)
    max_request_bytes: int = Field(64 << 20, ge=1)  # whole body of a form (uploads)
    max_json_bytes: int = Field(1 << 20, ge=1)  # whole body of any other request (JSON)
    max_inflight_bytes: int = Field(256 << 20, ge=1)  # bodies one worker holds at once; more: 429
    # Search (/similar): an `aegan encode` output indexed by `aegan index`, and its files' folder.
    gallery: str = ""
    gallery_root: str = ""
    # Keys (auth.py): the keys file (`aegan keys create`), unset: off; 1 lets /metrics be read
    # without a key.
    api_keys_file: str = ""
    metrics_public: Flag = False
    # Quotas (quotas.py): budgets per caller, on when a rate is set; the burst defaults to the
    # rate rounded up (a window of about a second).
    quota_requests_per_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    quota_requests_burst: int | None = Field(None, ge=1)
    quota_images_per_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    quota_images_burst: int | None = Field(None, ge=1)
    # memory:// (per worker) or redis://[:password@]host:port[/db] (shared)
    rate_limit_storage: StorageUrl = "memory://"
    # What happens while Redis is unreachable: local | open | closed (quotas.py)
    rate_limit_failure: Annotated[Literal["local", "open", "closed"], BeforeValidator(_lower)] = (
        "local"
    )
    auth_failures_per_min: int = Field(20, ge=1)  # wrong keys per client address and minute


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            key.lower(): value
            for key, value in self._environ.items()
            if not (self.env_ignore_empty and not value.strip())
        }


def read_environment(environ: Mapping[str, str] = os.environ) -> Environment:
    """The ``AEGAN_*`` variables of ``environ``, validated; :class:`SettingsError` naming every
    variable that is wrong and why."""
    try:
        return Environment.model_validate(_MappingSource(Environment, environ)())
    except ValidationError as exc:
        raise SettingsError("; ".join(_message(error) for error in exc.errors())) from None


def _message(error: Any) -> str:
    """One pydantic error as the sentence a user reads: ``AEGAN_MAX_N='many' is not an integer``."""
    name = env_var(str(error["loc"][0]))  # every check is a field's: no error without a field
    value, kind, ctx = error.get("input"), error["type"], error.get("ctx")
    if name == env_var("rate_limit_storage") and isinstance(value, str):
        value = redacted(value)
    shown = f"{name}={value!r}"
    if kind == "int_parsing":  # the values are text: never int_from_float
        return f"{shown} is not an integer"
    if kind == "float_parsing":
        return f"{shown} is not a number"
    if kind == "greater_than_equal":
        return f"{name}={value} must be at least {ctx['ge']}"
    if kind == "greater_than":
        return f"{name}={value} must be a number above {ctx['gt']}"
    if kind == "finite_number":
        return f"{shown} must be a finite number"
    if kind == "literal_error":
        choices = ctx["expected"].replace("'", "").replace(" or ", ", ")
        return f"{shown} must be one of {choices}"
    if kind == "value_error":
        return f"{shown} {ctx['error']}"
    return f"{shown}: {error['msg']}"


@dataclass(frozen=True)
class Limits:
    """Per-request limits (the ``max_*`` variables of :class:`Environment`). Each violation is
    answered with a 4xx that names the limit."""

    max_images: int
    max_upload_bytes: int
    max_pixels: int
    max_n: int
    max_steps: int
    max_request_bytes: int
    max_json_bytes: int
    max_inflight_bytes: int

    @classmethod
    def from_environment(cls, env: Environment) -> Limits:
        if env.max_inflight_bytes < env.max_request_bytes:
            raise SettingsError(
                f"AEGAN_MAX_INFLIGHT_BYTES={env.max_inflight_bytes} must be at least "
                f"AEGAN_MAX_REQUEST_BYTES ({env.max_request_bytes}): one request must always fit"
            )
        return cls(**{f.name: getattr(env, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Settings:
    """What the service runs with (:class:`Environment` says what each field is), the defaults
    that depend on the machine decided."""

    model: str
    device: str
    workers: int
    threads: int
    batch_size: int
    batch_latency_ms: int
    max_queue: int
    fp16: bool
    cuda_algo_search: str
    cuda_mem_limit: int
    cuda_arena: str
    cuda_tf32: bool
    limits: Limits
    gallery: str = ""
    gallery_root: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        return cls.from_environment(read_environment(environ))

    @classmethod
    def from_environment(cls, env: Environment) -> Settings:
        limits = Limits.from_environment(env)
        if env.max_queue < limits.max_images:
            raise SettingsError(
                f"AEGAN_MAX_QUEUE={env.max_queue} must be at least AEGAN_MAX_IMAGES="
                f"{limits.max_images} (one request's images always fit in the queue)"
            )
        cuda = CudaOptions(
            algo_search=env.cuda_algo_search,
            mem_limit=env.cuda_mem_limit,
            arena=env.cuda_arena,
            tf32=env.cuda_tf32,
        )
        gpu = env.device != "cpu" and gpu_usable(cuda)
        workers = env.workers or (1 if gpu else available_cpus())
        return cls(
            model=env.model,
            device=env.device,
            workers=workers,
            threads=env.threads or max(1, available_cpus() // workers),
            batch_size=env.batch_size or (GPU_BATCH_SIZE if gpu else 64),
            batch_latency_ms=env.batch_latency_ms,
            max_queue=env.max_queue,
            fp16=env.fp16,
            cuda_algo_search=cuda.algo_search,
            cuda_mem_limit=cuda.mem_limit,
            cuda_arena=cuda.arena,
            cuda_tf32=cuda.tf32,
            limits=limits,
            gallery=env.gallery,
            gallery_root=env.gallery_root,
        )

    def cuda_options(self) -> CudaOptions:
        return CudaOptions(
            algo_search=self.cuda_algo_search,
            mem_limit=self.cuda_mem_limit,
            arena=self.cuda_arena,
            tf32=self.cuda_tf32,
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


def cuda_unusable_reason(options: CudaOptions) -> str | None:
    """None when ONNX Runtime's CUDA provider works here with ``options``, else why not (checked
    once per process, in a child process: aegan_core/cuda.py)."""
    return check_in_subprocess(options)


def gpu_usable(options: CudaOptions) -> bool:
    """The worker layout's question: will a worker run on CUDA? Decided by making a CUDA session,
    not by the presence of device files."""
    return cuda_unusable_reason(options) is None
