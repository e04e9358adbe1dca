"""ONNX Runtime's CUDA execution provider: its options, its libraries, and whether it works here.

"Usable" is decided by what the provider does, not by what the machine looks like: a GPU's device
files and a listed ``CUDAExecutionProvider`` say nothing about whether the CUDA and cuDNN libraries
load (onnxruntime-gpu lists the provider even where they are missing, then runs on the CPU). So
:func:`check` loads the libraries (``onnxruntime.preload_dlls``, which finds those of the
``onnxruntime-gpu[cuda,cudnn]`` wheels), creates a CUDA session on a tiny graph (a convolution, for
cuDNN, and a matrix product, for cuBLAS), checks that the session kept the provider and runs it
against a result computed here. Whatever ONNX Runtime writes to the process's stderr meanwhile
(the text of a library that did not load) becomes part of the reason.

:func:`check_in_subprocess` runs that check in a child process: the server's main process decides
its worker layout with it at start-up and must not hold a CUDA context of its own.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
import onnxruntime as ort

from .errors import UserError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
AlgoSearch = Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"]  # cudnn_conv_algo_search
ArenaStrategy = Literal["kSameAsRequested", "kNextPowerOfTwo"]  # arena_extend_strategy
ALGO_SEARCHES: tuple[str, ...] = get_args(AlgoSearch)
ARENA_STRATEGIES: tuple[str, ...] = get_args(ArenaStrategy)
CHECK_TIMEOUT_S = 120  # the child process's check (CUDA initialisation is seconds, not minutes)


class DeviceError(UserError, RuntimeError):
    """CUDA cannot be used here. ``gpu_present``: the driver reports a GPU (so CUDA failing is a
    fault worth a warning, not the normal case of a machine without one)."""

    def __init__(self, message: str, gpu_present: bool = True) -> None:
        super().__init__(message)
        self.gpu_present = gpu_present


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA provider's options the service sets (``AEGAN_CUDA_*``, aegan_serve/config.py)."""

    device_id: int = 0
    # cuDNN's convolution algorithm choice for each new input shape: HEURISTIC asks cuDNN for its
    # best guess (fast start); EXHAUSTIVE times every algorithm once per shape (ONNX Runtime's
    # default: slow first requests, sometimes faster steady state).
    algo_search: str = "HEURISTIC"
    mem_limit: int = 0  # bytes the provider's memory arena may hold; 0: no limit
    # How the arena grows: by what a run asks for (kSameAsRequested, little waste when batch sizes
    # vary) or to the next power of two (ONNX Runtime's default: fewer, larger allocations).
    arena: str = "kSameAsRequested"
    # TF32 tensor-core matrix products on Ampere and later: faster, about 1e-3 relative error
    # instead of fp32's 1e-7. Off, so results match the CPU's within the parity tolerance.
    tf32: bool = False

    def provider_options(self) -> dict[str, str]:
        options = {
            "device_id": str(self.device_id),
            "cudnn_conv_algo_search": self.algo_search,
            "arena_extend_strategy": self.arena,
            "use_tf32": "1" if self.tf32 else "0",
        }
        if self.mem_limit:
            options["gpu_mem_limit"] = str(self.mem_limit)
        return options

    def providers(self) -> list[tuple[str, dict[str, str]] | str]:
        return [(CUDA, self.provider_options()), CPU]


# --- the driver and the libraries -----------------------------------------------------------------


def driver_reason() -> str | None:
    """None when ONNX Runtime has a CUDA provider and the NVIDIA driver reports a device; else why
    not. Asks the driver directly: no CUDA context is made."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build has no {CUDA} (providers: {ort.get_available_providers()})"
    for lib in ("libcuda.so.1", "nvcuda.dll", "libcuda.dylib"):
        try:
            driver = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return "no NVIDIA driver on this machine"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return "the NVIDIA driver reports an error (no usable GPU)"
    if count.value < 1:
        return "no CUDA device"
    return None


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """The lines written to file descriptor 2 inside the block (ONNX Runtime's C++ log, e.g.
    'Failed to load library libonnxruntime_providers_cuda.so with error: libcudnn.so.9: ...'),
    kept instead of printed; the list is filled when the block ends."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as spool:
        os.dup2(spool.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            spool.seek(0)
            lines.extend(spool.read().decode(errors="replace").splitlines())


def library_text(lines: list[str]) -> str:
    """The lines of ONNX Runtime's log that say why a library or provider did not load."""
    keep = [line.strip() for line in lines if "fail" in line.lower() or "error" in line.lower()]
    return " | ".join(keep)


@functools.cache
def preload_libraries() -> str | None:
    """``onnxruntime.preload_dlls()`` once per process, before any CUDA session: it loads the CUDA
    and cuDNN libraries of the ``nvidia-*`` wheels that ``onnxruntime-gpu[cuda,cudnn]`` installs
    (without it they are not found outside a CUDA image). None when it ran or does not exist
    (onnxruntime < 1.21); else its error text."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return None
    printed = io.StringIO()  # it prints what did not load
    with captured_stderr() as lines, redirect_stdout(printed):
        try:
            preload()
        except Exception as exc:  # a library that is there but does not load
            return f"onnxruntime.preload_dlls() failed: {exc}"
    text = library_text(printed.getvalue().splitlines() + lines)
    return f"onnxruntime.preload_dlls(): {text}" if text else None


# --- the check ------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    """One protobuf field: an integer (varint) or a length-delimited string / message."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:  # onnx.TensorProto, float32
    dims = b"".join(_field(1, d) for d in array.shape)
    return dims + _field(2, 1) + _field(8, name) + _field(9, array.astype("<f4").tobytes())


def _value_info(name: str, shape: tuple[int | str, ...]) -> bytes:  # onnx.ValueInfoProto, float32
    dims = b"".join(_field(1, _field(1 if isinstance(d, int) else 2, d)) for d in shape)
    return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, dims)))


def _node(op: str, inputs: list[str], output: str) -> bytes:  # onnx.NodeProto
    return b"".join(_field(1, i) for i in inputs) + _field(2, output) + _field(4, op)


CHECK_CONV = np.linspace(-1.0, 1.0, 2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)
CHECK_MATRIX = np.linspace(-0.5, 0.5, 8 * 4, dtype=np.float32).reshape(8, 4)


@functools.cache
def check_graph() -> bytes:
    """A tiny ONNX model, serialised here (the serving image has no ``onnx`` package):
    y = Flatten(Conv(x, W)) @ M, x of shape (N, 1, 4, 4), y of shape (N, 4)."""
    graph = b"".join(
        [
            _field(1, _node("Conv", ["x", "W"], "c")),
            _field(1, _node("Flatten", ["c"], "f")),
            _field(1, _node("MatMul", ["f", "M"], "y")),
            _field(2, "cuda_check"),
            _field(5, _tensor("W", CHECK_CONV)),
            _field(5, _tensor("M", CHECK_MATRIX)),
            _field(11, _value_info("x", ("N", 1, 4, 4))),
            _field(12, _value_info("y", ("N", 4))),
        ]
    )
    opset = _field(1, "") + _field(2, 17)
    return _field(1, 8) + _field(8, opset) + _field(7, graph)


def check_expected(x: np.ndarray) -> np.ndarray:
    """What :func:`check_graph` computes, in float64 with numpy."""
    windows = np.lib.stride_tricks.sliding_window_view(x[:, 0].astype(np.float64), (3, 3), (1, 2))
    conv = np.einsum("nhwij,kij->nkhw", windows, CHECK_CONV[:, 0].astype(np.float64))
    return np.asarray(conv.reshape(len(x), -1) @ CHECK_MATRIX.astype(np.float64))


def check(options: CudaOptions = CudaOptions()) -> None:
    """Raise :class:`DeviceError` saying why CUDA is not usable with ``options``; return when a
    CUDA session was made, kept the provider and computed the check graph correctly."""
    reason = driver_reason()
    if reason is not None:
        raise DeviceError(reason, gpu_present=False)
    preload_error = preload_libraries()
    with captured_stderr() as lines:
        try:
            session = ort.InferenceSession(check_graph(), providers=options.providers())
        except Exception as exc:  # a bad option, no device memory, a driver mismatch, ...
            session, error = None, exc
    log = library_text(lines)
    if session is None:
        raise DeviceError(_joined(f"{CUDA} failed to start: {error}", log, preload_error))
    if CUDA not in session.get_providers():
        raise DeviceError(
            _joined(
                f"{CUDA} is listed but did not initialise (CUDA or cuDNN libraries missing or "
                "incompatible: install onnxruntime-gpu[cuda,cudnn], docs/SERVING.md)",
                log,
                preload_error,
            )
        )
    x = np.linspace(-1.0, 1.0, 3 * 16, dtype=np.float32).reshape(3, 1, 4, 4)
    try:
        y = session.run(None, {"x": x})[0]
    except Exception as exc:  # e.g. no kernel image for this GPU's architecture
        raise DeviceError(f"a CUDA session was made but did not run: {exc}") from exc
    expected = check_expected(x)
    if y.shape != expected.shape or not np.allclose(y, expected, rtol=1e-2, atol=1e-2):
        raise DeviceError(f"CUDA computed a wrong result on the check graph: {y} != {expected}")


def _joined(*parts: str | None) -> str:
    return "; ".join(part for part in parts if part)


@functools.cache
def check_in_subprocess(options: CudaOptions = CudaOptions()) -> str | None:
    """:func:`check` in a child process: None when CUDA is usable, else the reason. The driver is
    asked first, here, so a machine without a GPU starts no child. Once per process and options."""
    reason = driver_reason()
    if reason is not None:
        return reason
    command = [sys.executable, "-m", __name__, json.dumps(asdict(options))]
    # The child finds this package wherever the server was started from (not only from its root).
    where = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (where, os.environ.get("PYTHONPATH", "")) if p)
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            env={**os.environ, "PYTHONPATH": path},
        )
    except subprocess.TimeoutExpired:
        return f"the CUDA check did not finish in {CHECK_TIMEOUT_S} s"
    try:
        reason = json.loads(done.stdout.strip().splitlines()[-1])["reason"]
        return None if reason is None else str(reason)
    except (IndexError, ValueError, KeyError, TypeError):
        tail = (done.stderr or done.stdout).strip()[-2000:]
        return f"the CUDA check failed (exit status {done.returncode}): {tail}"


def _main() -> None:
    options = CudaOptions(**json.loads(sys.argv[1])) if len(sys.argv) > 1 else CudaOptions()
    try:
        check(options)
        reason = None
    except DeviceError as exc:
        reason = str(exc)
    print(json.dumps({"reason": reason}))


if __name__ == "__main__":
    _main()
