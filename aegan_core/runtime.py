"""ONNX Runtime sessions for a bundle's generator and encoder, created once per server worker.

Device choice (``AEGAN_DEVICE``): ``auto`` uses the CUDA execution provider when it works here (see
aegan_core/cuda.py: the libraries load, a session keeps the provider and computes), else the CPU
provider, with the reason logged and shown in ``/info``; ``cuda`` requires CUDA and fails at
start-up otherwise, with the reason; ``cpu`` never tries CUDA.

On CUDA: inputs and outputs go through IO binding; the bundle's fp16 graphs are used when it has
them (their inputs and outputs are float32 as well); batches are padded to a few fixed sizes
(powers of two up to the largest batch the service forms), each warmed up at start-up, so no
request meets a shape cuDNN has not planned for; one lock serialises the worker's GPU work (one
stream, one set of cuBLAS/cuDNN handles in use at a time). The CPU sessions are made in every case:
they check the bundle's contract and take over in ``auto`` mode when CUDA fails after start-up (an
error or non-finite output), with the reason logged and reported to ``on_fallback``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
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
from .cuda import (
    CPU,
    CUDA,
    CudaOptions,
    DeviceError,
    captured_stderr,
    library_text,
    preload_libraries,
)
from .cuda import driver_reason as cuda_unavailable_reason

__all__ = [
    "CPU",
    "CUDA",
    "CudaOptions",
    "DeviceError",
    "Graph",
    "ModelRuntime",
    "available_cpus",
    "buckets",
    "cuda_unavailable_reason",
    "gpu_visible",
    "open_session",
    "session_options",
]

logger = logging.getLogger("bentoml.aegan_serve")

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "QUOTA PERIOD" or "max PERIOD"
NVIDIA_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0")

# Largest gap, on a fixed batch, between the fp16 CUDA graphs and the fp32 CPU graphs that the
# fp16 graphs are trusted with (pixels in [-1, 1]); beyond it auto mode runs fp32 on CUDA.
FP16_MAX_ABS_ERROR = 0.1


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


Providers = list[str | tuple[str, dict[str, str]]]


def open_session(
    model: str | bytes, providers: Providers, threads: int = 0, *, quiet: bool = False
) -> ort.InferenceSession:
    """The one way a session is made (the service, the batch jobs, export's parity checks and the
    directions): ``model`` a path or serialised ONNX, ``providers`` in order of preference,
    :func:`session_options` of ``threads`` (0: ONNX Runtime's default); ``quiet`` shows errors
    only (no warnings)."""
    options = session_options(threads)
    if quiet:
        options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=providers)


@dataclass
class Graph:
    """One inference session with its input and output tensor names."""

    session: ort.InferenceSession
    input_name: str
    output_name: str
    device_id: int | None  # CUDA device for IO binding; None on CPU
    role: str = ""  # the bundle file it runs (generator, generator_fp16, ...)

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.device_id is None:
            return np.asarray(self.session.run([self.output_name], {self.input_name: batch})[0])
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])


def buckets(max_rows: int) -> tuple[int, ...]:
    """The batch sizes CUDA runs: powers of two up to the first at least ``max_rows``."""
    sizes = [1]
    while sizes[-1] < max_rows:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def _padded(batch: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """``batch`` with zero rows appended up to the next size in ``sizes`` (unchanged past them)."""
    size = next((s for s in sizes if s >= len(batch)), len(batch))
    if size == len(batch):
        return batch
    return np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])


class ModelRuntime:
    """The generator (z -> x) and encoder (x -> z) of one bundle on the chosen device."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        threads: int = 1,
        device_id: int = 0,
        fp16: bool = True,
        cuda: CudaOptions | None = None,
        max_rows: int = 64,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        """``max_rows``: the largest batch either graph will be given (CUDA warms up to it);
        ``on_fallback(reason)``: called when auto mode leaves CUDA for the CPU (e.g. a metric)."""
        self.bundle = bundle
        self.device = device
        self.threads = threads
        self.cuda_options = cuda or CudaOptions(device_id=device_id)
        self.buckets = buckets(max_rows)
        self.on_fallback = on_fallback
        self.fallbacks = 0  # times auto mode left CUDA for the CPU
        self.cuda_reason: str | None = "AEGAN_DEVICE=cpu"  # why CUDA is not in use; None on CUDA
        self.fp16_error: dict[str, float] = {}  # fp16 CUDA against fp32 CPU, measured at start
        self._lock = threading.Lock()  # one stream of GPU work per worker
        self._cpu = {role: self._graph(role, [CPU]) for role in (GENERATOR, ENCODER)}
        self._cuda: dict[str, Graph] = {}
        self._check_contract()
        if device in ("auto", "cuda"):
            wants_fp16 = fp16 and bundle.has(GENERATOR_FP16) and bundle.has(ENCODER_FP16)
            try:
                self._start_cuda(wants_fp16)
            except DeviceError as exc:
                if device == "cuda":
                    raise DeviceError(f"AEGAN_DEVICE=cuda but {exc}", exc.gpu_present) from exc
                self._leave_cuda(str(exc), counted=exc.gpu_present)

    @property
    def provider(self) -> str:
        return CUDA if self._cuda else CPU

    @property
    def fp16(self) -> bool:  # fp16 graphs are for the GPU only
        return bool(self._cuda) and self._cuda[GENERATOR].role != GENERATOR

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    @property
    def generator(self) -> Graph:
        return self._cuda.get(GENERATOR) or self._cpu[GENERATOR]

    @property
    def encoder(self) -> Graph:
        return self._cuda.get(ENCODER) or self._cpu[ENCODER]

    def generate(self, latents: np.ndarray) -> np.ndarray:
        """(N, latent_dim) -> (N, *data_shape) float32 (images in [-1, 1])."""
        return self._run(GENERATOR, latents)

    def encode(self, data: np.ndarray) -> np.ndarray:
        """(N, *data_shape) -> (N, latent_dim) float32."""
        return self._run(ENCODER, data)

    # --- internals -------------------------------------------------------------------------------

    def _graph(self, role: str, providers: list[str | tuple[str, dict[str, str]]]) -> Graph:
        session = open_session(str(self.bundle.file(role)), providers, self.threads)
        input_name, output_name = self.bundle.tensor_names(role)
        device_id = self.cuda_options.device_id if providers[0] != CPU else None
        return Graph(session, input_name, output_name, device_id, role)

    def _run(self, role: str, batch: np.ndarray) -> np.ndarray:
        cuda = self._cuda  # one read: a fallback on another thread replaces it
        if cuda:
            try:
                return self._run_cuda(cuda[role], batch)
            except Exception as exc:  # out of memory, a cuDNN error, non-finite fp16 output, ...
                if self.device == "cuda":
                    raise
                self._leave_cuda(f"{role} failed on CUDA: {exc}", counted=True, failed=cuda)
        return self._cpu[role].run(batch)

    def _run_cuda(self, graph: Graph, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            out = graph.run(_padded(np.asarray(batch, np.float32), self.buckets))[: len(batch)]
        if not np.isfinite(out).all() and np.isfinite(batch).all():
            precision = "fp16" if graph.role in (GENERATOR_FP16, ENCODER_FP16) else "fp32"
            raise DeviceError(f"{graph.role} gave non-finite values on CUDA ({precision})")
        return out

    def _start_cuda(self, fp16: bool) -> None:
        """CUDA sessions of both graphs (fp16 ones if asked), each warmed up at every bucket and
        compared with the CPU's result; :class:`DeviceError` saying why not."""
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise DeviceError(reason, gpu_present=False)
        preload_error = preload_libraries()
        providers = self.cuda_options.providers()
        roles = {GENERATOR: GENERATOR_FP16, ENCODER: ENCODER_FP16} if fp16 else {}
        with captured_stderr() as lines:
            try:
                graphs = {r: self._graph(roles.get(r, r), providers) for r in (GENERATOR, ENCODER)}
            except Exception as exc:  # no device memory, a bad option, a driver mismatch, ...
                graphs, error = {}, exc
        log = "; ".join(t for t in (library_text(lines), preload_error) if t)
        if not graphs:
            raise DeviceError(f"{CUDA} failed to start: {error}" + (f"; {log}" if log else ""))
        for graph in graphs.values():
            if CUDA not in graph.session.get_providers():
                raise DeviceError(
                    f"{CUDA} is listed but did not initialise (CUDA or cuDNN libraries missing "
                    "or incompatible: install onnxruntime-gpu[cuda,cudnn], docs/SERVING.md)"
                    + (f"; {log}" if log else "")
                )
        try:
            self._warm_up(graphs)
        except DeviceError as exc:
            if not fp16:
                raise
            logger.warning("fp16 graphs not used on CUDA (%s); trying the fp32 graphs", exc)
            self._start_cuda(fp16=False)
            return
        self._cuda = graphs
        self.cuda_reason = None

    def _warm_up(self, graphs: dict[str, Graph]) -> None:
        """Run each graph at every bucket (cuDNN plans each shape once, here, not in a request)
        and compare a fixed batch with the CPU graphs'."""
        rng = np.random.default_rng(0)
        inputs = {
            GENERATOR: rng.standard_normal((self.buckets[-1], self.bundle.latent_dim)),
            ENCODER: rng.uniform(-1, 1, (self.buckets[-1], *self.bundle.data_shape)),
        }
        for role, graph in graphs.items():
            batch = inputs[role].astype(np.float32)
            try:
                for size in self.buckets:
                    out = self._run_cuda(graph, batch[:size])
            except Exception as exc:
                if isinstance(exc, DeviceError):
                    raise
                raise DeviceError(f"{role} does not run on CUDA: {exc}") from exc
            error = float(np.abs(out - self._cpu[role].run(batch)).max())
            self.fp16_error[role] = error
            if graph.role != role and error > FP16_MAX_ABS_ERROR:
                raise DeviceError(
                    f"{graph.role} differs from the fp32 graph by {error:.3g} (more than "
                    f"{FP16_MAX_ABS_ERROR}) on CUDA"
                )
        if not any(g.role != r for r, g in graphs.items()):
            self.fp16_error = {}

    def _leave_cuda(
        self, reason: str, counted: bool, failed: dict[str, Graph] | None = None
    ) -> None:
        """Run on the CPU from now on. ``counted``: a GPU was there and failed (a warning and
        ``on_fallback``), not merely absent. ``failed``: the CUDA graphs a run failed on; when
        another thread has already left them, nothing more is done (one fallback, counted once)."""
        with self._lock:
            if failed is not None and self._cuda is not failed:
                return
            self._cuda = {}  # releases the CUDA sessions once in-flight runs finish
            self.cuda_reason = reason
            self.fp16_error = {}
        if not counted:
            logger.info("CUDA not used (%s); running on CPU", reason)
            return
        self.fallbacks += 1
        logger.warning("CUDA abandoned, running on CPU from now on: %s", reason)
        if self.on_fallback is not None:
            self.on_fallback(reason)

    def _check_contract(self) -> None:
        """Run both CPU graphs once and refuse a bundle whose graphs disagree with its manifest's
        shapes."""
        latent_dim, data_shape = self.bundle.latent_dim, self.bundle.data_shape
        if self.bundle.kind == "image" and (len(data_shape) != 3 or data_shape[0] not in (1, 3)):
            raise BundleError(
                f"{self.bundle.path}: image bundles need data_shape (C, H, W) with C = 1 or 3, "
                f"got {data_shape}"
            )
        try:
            x = self._cpu[GENERATOR].run(np.zeros((2, latent_dim), np.float32))
            z = self._cpu[ENCODER].run(np.zeros((2, *data_shape), np.float32))
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
