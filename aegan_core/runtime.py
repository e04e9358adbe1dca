"""ONNX Runtime sessions for a bundle's generator and encoder, created once per server worker.

Device choice (``AEGAN_DEVICE``): ``auto`` uses the CUDA execution provider when it is listed *and*
actually initialises (onnxruntime-gpu lists it even where the CUDA libraries are missing, and then
silently falls back), else the CPU provider; ``cuda`` requires CUDA and fails at start-up otherwise;
``cpu`` never tries CUDA. On CUDA, inputs and outputs go through IO binding and the bundle's fp16
graphs are used when it has them (their inputs and outputs are float32 as well).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import (
    ENCODER,
    ENCODER_FP16,
    GENERATOR,
    GENERATOR_FP16,
    Bundle,
    BundleError,
)
from .errors import UserError

logger = logging.getLogger("bentoml.aegan_serve")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ORT_DEFAULT_LOG_SEVERITY = 2  # warnings and above
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "QUOTA PERIOD" or "max PERIOD"
NVIDIA_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0")


class DeviceError(UserError, RuntimeError):
    """The requested device cannot be used (e.g. ``AEGAN_DEVICE=cuda`` without a working GPU)."""


def session_options(threads: int) -> ort.SessionOptions:
    """Explicit thread counts so that several workers on one host do not oversubscribe its CPUs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle threads sleep instead of spinning: a server is idle between requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass
class Graph:
    """One inference session with its input and output tensor names."""

    session: ort.InferenceSession
    input_name: str
    output_name: str
    device_id: int | None  # CUDA device for IO binding; None on CPU

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.device_id is None:
            return np.asarray(self.session.run([self.output_name], {self.input_name: batch})[0])
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])


def cuda_unavailable_reason() -> str | None:
    """None when ONNX Runtime has a CUDA provider and the driver reports a CUDA device; else why
    not. Asks the driver directly (no session is created, so nothing is logged as an error)."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build has no {CUDA} (providers: {ort.get_available_providers()})"
    for lib in ("libcuda.so.1", "nvcuda.dll", "libcuda.dylib"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return "no NVIDIA driver on this machine"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return "the NVIDIA driver reports an error (no usable GPU)"
    if count.value < 1:
        return "no CUDA device"
    return None


def _cuda_session(path: Path, threads: int, device_id: int, quiet: bool) -> ort.InferenceSession:
    """A session on CUDA, or ``DeviceError`` saying why CUDA could not be used."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise DeviceError(reason)
    if quiet:  # auto mode: the fallback is expected and logged below, not an error
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(
            str(path),
            sess_options=session_options(threads),
            providers=[(CUDA, {"device_id": device_id}), CPU],
        )
    except Exception as exc:  # no device, driver mismatch, out of memory, ...
        raise DeviceError(f"{CUDA} failed to start: {exc}") from exc
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)
    if CUDA not in session.get_providers():
        raise DeviceError(
            f"{CUDA} is listed but did not initialise (CUDA or cuDNN libraries missing or "
            "incompatible, or no GPU visible); see the onnxruntime CUDA requirements"
        )
    return session


class ModelRuntime:
    """The generator (z -> x) and encoder (x -> z) of one bundle on the chosen device."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        threads: int = 1,
        device_id: int = 0,
        fp16: bool = True,
    ) -> None:
        self.bundle = bundle
        self.threads = threads
        self.fp16 = fp16 and bundle.has(GENERATOR_FP16) and bundle.has(ENCODER_FP16)
        self.provider = CPU
        probe = None
        if device in ("auto", "cuda"):
            role = GENERATOR_FP16 if self.fp16 else GENERATOR
            try:
                probe = _cuda_session(bundle.file(role), threads, device_id, device == "auto")
                self.provider = CUDA
            except DeviceError as exc:
                if device == "cuda":
                    raise DeviceError(f"AEGAN_DEVICE=cuda but {exc}") from exc
                logger.info("CUDA not used (%s); running on CPU", exc)
        on_cuda = self.provider == CUDA
        self.fp16 = self.fp16 and on_cuda  # fp16 graphs are for the GPU only
        providers = [(CUDA, {"device_id": device_id}), CPU] if on_cuda else [CPU]

        def graph(role: str, session: ort.InferenceSession | None = None) -> Graph:
            if session is None:
                session = ort.InferenceSession(
                    str(bundle.file(role)),
                    sess_options=session_options(threads),
                    providers=providers,
                )
            input_name, output_name = bundle.tensor_names(role)
            return Graph(session, input_name, output_name, device_id if on_cuda else None)

        self.generator = graph(GENERATOR_FP16 if self.fp16 else GENERATOR, probe)
        self.encoder = graph(ENCODER_FP16 if self.fp16 else ENCODER)
        self._check_contract()

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def generate(self, latents: np.ndarray) -> np.ndarray:
        """(N, latent_dim) -> (N, *data_shape) float32 (images in [-1, 1])."""
        return self.generator.run(latents)

    def encode(self, data: np.ndarray) -> np.ndarray:
        """(N, *data_shape) -> (N, latent_dim) float32."""
        return self.encoder.run(data)

    def _check_contract(self) -> None:
        """Run both graphs once (also a warm-up) and refuse a bundle whose graphs disagree with
        its manifest's shapes."""
        latent_dim, data_shape = self.bundle.latent_dim, self.bundle.data_shape
        if self.bundle.kind == "image" and (len(data_shape) != 3 or data_shape[0] not in (1, 3)):
            raise BundleError(
                f"{self.bundle.path}: image bundles need data_shape (C, H, W) with C = 1 or 3, "
                f"got {data_shape}"
            )
        try:
            x = self.generate(np.zeros((2, latent_dim), np.float32))
            z = self.encode(np.zeros((2, *data_shape), np.float32))
        except Exception as exc:  # ORT reports shape and type errors with its own exceptions
            raise BundleError(
                f"{self.bundle.path}: graphs do not run on the manifest's shapes: {exc}"
            ) from exc
        if x.shape != (2, *data_shape) or z.shape != (2, latent_dim):
            raise BundleError(
                f"{self.bundle.path}: generator gives {x.shape[1:]} (manifest data_shape "
                f"{data_shape}), encoder gives {z.shape[1:]} (manifest latent_dim {latent_dim})"
            )
        if not (np.isfinite(x).all() and np.isfinite(z).all()):
            raise BundleError(f"{self.bundle.path}: graphs produce non-finite values on zeros")


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity (e.g. a container's cpuset), bounded by a cgroup
    v2 CPU quota (e.g. a container's CPU limit), rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 CPU controller here
        pass
    return max(1, cpus)


def gpu_visible() -> bool:
    """An NVIDIA GPU's device node is present (no driver call: this runs when the service module
    is imported, before any worker starts)."""
    return any(Path(node).exists() for node in NVIDIA_DEVICE_NODES)
