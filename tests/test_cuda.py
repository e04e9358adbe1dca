"""The CUDA path on a machine without a GPU: ONNX Runtime's CUDA provider is stood in for by CPU
sessions that report it (and go through IO binding as a CUDA session does), so what the runtime
does with a provider that works, that never initialised, or that fails after start-up is checked
here, each with the providers the sessions really report."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from aegan_core import cuda, runtime
from aegan_core.bundle import load_bundle
from aegan_core.cuda import CPU, CUDA, CudaOptions, DeviceError
from aegan_core.runtime import ModelRuntime, buckets
from aegan_serve import config
from aegan_serve.config import Settings, SettingsError

LIBRARY_ERROR = (
    "[E:onnxruntime:Default, provider_bridge_ort.cc:2000 TryGetProviderInfo_CUDA] Failed to load "
    "library libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared "
    "object file: No such file or directory\n"
)

NOT_INITIALISED = (
    f"{CUDA} is listed but did not initialise (CUDA or cuDNN libraries missing or incompatible: "
    "install onnxruntime-gpu[cuda,cudnn], docs/SERVING.md)"
)
LIBRARY_LINE = LIBRARY_ERROR.strip()
PRELOAD_ERROR = "onnxruntime.preload_dlls(): Failed to load libcublasLt.so.13"

RealSession = ort.InferenceSession


class StandIn:
    """What the stand-in CUDA provider does: which providers its sessions keep, what fails, and
    what it saw (options, batch sizes, concurrent runs)."""

    def __init__(self) -> None:
        self.keeps_cuda = True  # False: the provider "did not initialise" (libraries missing)
        self.creation_error: str | None = None
        self.run_error: str | None = None  # raised by every CUDA run from now on
        self.nan_roles: set[str] = set()  # model files whose CUDA runs give NaN
        self.offsets: dict[str, float] = {}  # model files whose CUDA runs are off by this much
        self.library_error = LIBRARY_ERROR  # what a provider that did not initialise prints
        self.ranges: dict[str, list[tuple[float, float]]] = {}  # lowest, highest input of each run
        self.options: list[dict[str, str]] = []
        self.sizes: dict[str, list[int]] = {}
        self.active = 0
        self.most_active = 0
        self.delay_s = 0.0
        self.output_devices: set[tuple[str, int]] = set()  # where IO binding put outputs


class FakeBinding:
    def __init__(self, session: FakeCudaSession) -> None:
        self.session, self.inputs, self.outputs = session, {}, []

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = array

    def bind_output(self, name: str, device: str, device_id: int) -> None:
        self.session.stand_in.output_devices.add((device, device_id))
        self.outputs.append(name)

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return self.results


class FakeCudaSession:
    """A CPU session that reports the CUDA provider and is run through IO binding."""

    def __init__(self, model: Any, stand_in: StandIn, **kwargs: Any) -> None:
        self.cpu = RealSession(model, sess_options=kwargs.get("sess_options"), providers=[CPU])
        self.stand_in = stand_in
        self.name = Path(model).name.removesuffix(".onnx") if isinstance(model, str) else "check"

    def get_providers(self) -> list[str]:
        return [CUDA, CPU] if self.stand_in.keeps_cuda else [CPU]

    def get_inputs(self) -> list[Any]:
        return self.cpu.get_inputs()

    def io_binding(self) -> FakeBinding:
        return FakeBinding(self)

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.cpu.run(outputs, feeds)

    def run_with_iobinding(self, binding: FakeBinding) -> None:
        s = self.stand_in
        s.active += 1
        s.most_active = max(s.most_active, s.active)
        try:
            time.sleep(s.delay_s)
            if s.run_error:
                raise RuntimeError(s.run_error)
            (batch,) = binding.inputs.values()
            s.sizes.setdefault(self.name, []).append(len(batch))
            s.ranges.setdefault(self.name, []).append((float(batch.min()), float(batch.max())))
            results = self.cpu.run(binding.outputs, binding.inputs)
            if self.name in s.nan_roles:
                results = [np.full_like(r, np.nan) for r in results]
            results = [r + np.float32(s.offsets.get(self.name, 0)) for r in results]
            binding.results = results
        finally:
            s.active -= 1


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    """CUDA "works" here: the driver reports a GPU and sessions asked for CUDA report it."""
    state = StandIn()

    def session(model: Any, sess_options: Any = None, providers: Any = None) -> Any:
        first = providers[0] if providers else CPU
        if first == CPU:
            return RealSession(model, sess_options=sess_options, providers=providers)
        name, options = first
        assert name == CUDA
        state.options.append(options)
        os.write(2, state.library_error.encode() if not state.keeps_cuda else b"")
        if state.creation_error:
            raise RuntimeError(state.creation_error)
        return FakeCudaSession(model, state, sess_options=sess_options)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(runtime, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda, "driver_reason", lambda: None)
    return state


# --- the check ------------------------------------------------------------------------------------


def test_the_check_graph_is_a_valid_model_computing_what_it_says():
    session = RealSession(cuda.check_graph(), providers=[CPU])
    x = np.random.default_rng(1).standard_normal((5, 1, 4, 4)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    assert y.shape == (5, 4)
    np.testing.assert_allclose(y, cuda.check_expected(x), rtol=1e-5, atol=1e-5)


def test_check_uses_cuda_when_a_session_keeps_it_and_computes(stand_in, monkeypatch):
    preloaded: list[str] = []
    monkeypatch.setattr(cuda, "preload_libraries", lambda: preloaded.append("yes"))
    cuda.check(CudaOptions(algo_search="EXHAUSTIVE", mem_limit=1 << 30, tf32=True))
    assert preloaded == ["yes"]  # before the session
    assert stand_in.options == [
        {
            "device_id": "0",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            "arena_extend_strategy": "kSameAsRequested",
            "use_tf32": "1",
            "gpu_mem_limit": str(1 << 30),
        }
    ]


def test_check_says_why_when_the_provider_did_not_initialise(stand_in):
    stand_in.keeps_cuda = False  # what onnxruntime-gpu does without the CUDA/cuDNN libraries
    with pytest.raises(DeviceError, match="did not initialise") as caught:
        cuda.check()
    assert "libcudnn.so.9: cannot open shared object file" in str(caught.value)  # not hidden
    assert caught.value.gpu_present


def test_check_reports_a_session_that_fails_or_computes_wrongly(stand_in, monkeypatch):
    stand_in.creation_error = "CUDA failure 100: no CUDA-capable device is detected"
    with pytest.raises(DeviceError, match="failed to start: .*no CUDA-capable device"):
        cuda.check()
    stand_in.creation_error = None
    monkeypatch.setattr(cuda, "check_expected", lambda x: np.zeros((len(x), 4)))
    with pytest.raises(DeviceError, match="wrong result"):
        cuda.check()


class FakeDriver:
    """The two calls of the NVIDIA driver's API that ``driver_reason`` makes."""

    def __init__(self, init: int = 0, count_status: int = 0, devices: int = 1) -> None:
        self.init, self.count_status, self.devices = init, count_status, devices
        self.flags: list[int] = []

    def cuInit(self, flags: int) -> int:  # noqa: N802 (the driver's name)
        self.flags.append(flags)
        return self.init

    def cuDeviceGetCount(self, count: Any) -> int:  # noqa: N802
        count._obj.value = self.devices
        return self.count_status


@pytest.mark.parametrize(
    ("found", "driver", "reason"),
    [
        ("libcuda.so.1", FakeDriver(), None),
        ("nvcuda.dll", FakeDriver(), None),
        ("libcuda.dylib", FakeDriver(devices=2), None),
        (None, None, "no NVIDIA driver on this machine"),
        (
            "libcuda.so.1",
            FakeDriver(init=100),
            "the NVIDIA driver reports an error (no usable GPU)",
        ),
        (
            "libcuda.so.1",
            FakeDriver(count_status=3),
            "the NVIDIA driver reports an error (no usable GPU)",
        ),
        ("libcuda.so.1", FakeDriver(devices=0), "no CUDA device"),
    ],
)
def test_the_driver_is_looked_for_by_name_and_asked_for_devices(monkeypatch, found, driver, reason):
    tried: list[str] = []

    def load(name: str) -> FakeDriver:
        tried.append(name)
        if name != found:
            raise OSError(f"{name}: cannot open shared object file")
        return driver

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(cuda.ctypes, "CDLL", load)
    assert cuda.driver_reason() == reason
    names = ["libcuda.so.1", "nvcuda.dll", "libcuda.dylib"]
    assert tried == (names if found is None else names[: names.index(found) + 1])
    if driver is not None:
        assert driver.flags == [0]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert cuda.driver_reason() == (f"this onnxruntime build has no {CUDA} (providers: ['{CPU}'])")


def test_the_library_text_keeps_the_lines_that_say_fail_or_error():
    lines = ["2026 [W] a warning\n", "  ERROR: libcudnn.so.9 missing \n", "it Failed to load\n"]
    assert cuda.library_text(lines) == "ERROR: libcudnn.so.9 missing | it Failed to load"


def test_without_a_driver_the_check_says_so_and_makes_no_session(monkeypatch):
    monkeypatch.setattr(cuda, "driver_reason", lambda: "no NVIDIA driver on this machine")
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: pytest.fail("a session was made"))
    with pytest.raises(DeviceError) as caught:
        cuda.check()
    assert str(caught.value) == "no NVIDIA driver on this machine"
    assert caught.value.gpu_present is False  # the normal case of a machine without a GPU


@pytest.mark.parametrize(
    ("creation_error", "message"),
    [
        (
            "CUDA failure 100: no CUDA-capable device is detected",
            f"{CUDA} failed to start: CUDA failure 100: no CUDA-capable device is detected; "
            f"{LIBRARY_LINE}; {PRELOAD_ERROR}",
        ),
        (None, f"{NOT_INITIALISED}; {LIBRARY_LINE}; {PRELOAD_ERROR}"),
    ],
)
def test_a_check_that_fails_says_why_with_the_library_log_and_the_preload_error(
    stand_in, monkeypatch, creation_error, message
):
    monkeypatch.setattr(cuda, "preload_libraries", lambda: PRELOAD_ERROR)
    stand_in.keeps_cuda = False  # the provider writes why it did not load
    stand_in.creation_error = creation_error
    with pytest.raises(DeviceError) as caught:
        cuda.check()
    assert str(caught.value) == message
    assert caught.value.gpu_present


def test_the_check_runs_a_fixed_batch_over_the_data_range_and_says_when_it_fails(
    stand_in, monkeypatch
):
    seen: list[np.ndarray] = []
    real = cuda.check_expected
    monkeypatch.setattr(cuda, "check_expected", lambda x: seen.append(x) or real(x))
    cuda.check()
    (x,) = seen
    assert x.shape == (3, 1, 4, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(x.ravel(), np.linspace(-1.0, 1.0, 48, dtype=np.float32))

    def broken(self, outputs, feeds):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(FakeCudaSession, "run", broken)
    with pytest.raises(DeviceError) as caught:
        cuda.check()
    assert str(caught.value) == (
        "a CUDA session was made but did not run: no kernel image is available for execution "
        "on the device"
    )


@pytest.mark.parametrize(
    ("computed", "usable"),
    [
        (lambda y: y + 0.009, True),  # within 0.01 everywhere, also where |y| is 0.05
        (lambda y: y * 1.005, True),  # within 1 %, also where |y| is 6.8
        (lambda y: y + 0.5, False),
        (lambda y: y * 2.0, False),
    ],
)
def test_the_check_allows_1_percent_or_0_01_and_no_more(stand_in, monkeypatch, computed, usable):
    """The session's result against the expected one (here the expected one is moved)."""
    real = cuda.check_expected
    monkeypatch.setattr(cuda, "check_expected", lambda x: computed(real(x)))
    if usable:
        cuda.check()
        return
    with pytest.raises(DeviceError, match="CUDA computed a wrong result on the check graph"):
        cuda.check()


def test_without_a_driver_no_child_process_is_started(monkeypatch):
    cuda.check_in_subprocess.cache_clear()
    monkeypatch.setattr(cuda, "driver_reason", lambda: "no NVIDIA driver on this machine")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a child was started"))
    assert cuda.check_in_subprocess(CudaOptions()) == "no NVIDIA driver on this machine"
    cuda.check_in_subprocess.cache_clear()


def test_the_child_process_check_reports_its_reason(monkeypatch):
    """The parent's driver check stood in for: the child runs the real check, which finds no
    driver on this machine (on a GPU machine it would make the CUDA session)."""
    real = cuda.driver_reason()
    if real is None:
        pytest.skip("a GPU is here: the child would make a real CUDA session")
    cuda.check_in_subprocess.cache_clear()
    monkeypatch.setattr(cuda, "driver_reason", lambda: None)
    try:
        assert cuda.check_in_subprocess(CudaOptions(tf32=True)) == real
    finally:
        cuda.check_in_subprocess.cache_clear()


def test_preload_runs_once_and_its_failures_are_text(monkeypatch):
    calls: list[int] = []

    def preload() -> None:
        calls.append(1)
        print("Failed to load libcublasLt.so.13: cannot open shared object file")

    cuda.preload_libraries.cache_clear()
    monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)
    try:
        first = cuda.preload_libraries()
        assert cuda.preload_libraries() == first and calls == [1]
    finally:
        cuda.preload_libraries.cache_clear()
    assert "libcublasLt.so.13" in first


# --- the worker's runtime -------------------------------------------------------------------------


def test_on_cuda_every_batch_size_is_warmed_up_and_requests_are_padded_to_them(
    stand_in, image_bundle
):
    bundle = load_bundle(image_bundle)
    options = CudaOptions(algo_search="HEURISTIC", arena="kNextPowerOfTwo")
    model = ModelRuntime(bundle, "cuda", cuda=options, max_rows=40)
    assert model.provider == CUDA and model.cuda_reason is None and model.precision == "fp32"
    assert model.generator.session.get_providers()[0] == CUDA  # what the session reports
    assert model.buckets == buckets(40) == (1, 2, 4, 8, 16, 32, 64)
    for name in ("generator", "encoder"):
        assert sorted(set(stand_in.sizes[name])) == list(model.buckets)
    assert {o["cudnn_conv_algo_search"] for o in stand_in.options} == {"HEURISTIC"}
    assert {o["arena_extend_strategy"] for o in stand_in.options} == {"kNextPowerOfTwo"}
    assert {o["use_tf32"] for o in stand_in.options} == {"0"}  # parity unless asked

    stand_in.sizes.clear()
    z = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    x = model.generate(z)
    assert stand_in.sizes == {"generator": [4]}  # a warmed-up shape, not a new one
    cpu = ModelRuntime(bundle, "cpu")
    np.testing.assert_allclose(x, cpu.generate(z), atol=1e-6)
    assert model.encode(x).shape == (3, 32)
    stand_in.sizes.clear()
    many = np.random.default_rng(1).standard_normal((70, 32)).astype(np.float32)
    np.testing.assert_allclose(model.generate(many), cpu.generate(many), atol=1e-6)
    assert stand_in.sizes == {"generator": [70]}  # past the largest size: as it is


def test_by_default_cuda_runs_the_fp16_graphs_on_device_0_warmed_up_to_64_rows(
    stand_in, rgb_bundle
):
    model = ModelRuntime(load_bundle(rgb_bundle), "cuda")
    assert model.provider == CUDA and model.precision == "fp16"
    assert {o["device_id"] for o in stand_in.options} == {"0"}
    assert model.generator.device_id == model.encoder.device_id == 0  # IO binding's device
    assert stand_in.output_devices == {("cuda", 0)}
    assert max(stand_in.sizes["encoder.fp16"]) == 64 == model.buckets[-1]


def test_outputs_stay_on_the_chosen_cuda_device(stand_in, image_bundle):
    model = ModelRuntime(load_bundle(image_bundle), "cuda", device_id=1)
    assert {o["device_id"] for o in stand_in.options} == {"1"}
    assert model.generate(np.zeros((2, 32), np.float32)).shape == (2, 1, 28, 28)
    assert stand_in.output_devices == {("cuda", 1)}


def test_auto_falls_back_to_the_cpu_when_cuda_fails_after_start(stand_in, image_bundle):
    reasons: list[str] = []
    model = ModelRuntime(load_bundle(image_bundle), "auto", on_fallback=reasons.append)
    assert model.provider == CUDA and model.fallbacks == 0
    z = np.zeros((5, 32), np.float32)
    expected = ModelRuntime(load_bundle(image_bundle), "cpu").generate(z)

    stand_in.run_error = "CUDA error: out of memory"
    np.testing.assert_allclose(model.generate(z), expected, atol=1e-6)  # answered all the same
    assert model.provider == CPU and model.fallbacks == 1
    assert model.generator.session.get_providers() == [CPU]
    assert "out of memory" in model.cuda_reason and reasons == [model.cuda_reason]


def test_the_service_on_cuda_says_so_at_start_and_counts_a_fallback(stand_in, image_bundle, caplog):
    from prometheus_client import REGISTRY

    from aegan_serve.app import Application

    environ = {"AEGAN_MODEL": str(image_bundle), "AEGAN_DEVICE": "auto", "AEGAN_THREADS": "1"}
    with caplog.at_level(logging.INFO, logger="bentoml.aegan_serve"):
        app = Application(Settings.from_env(environ))
    assert app.model.provider == CUDA
    lines = [r.getMessage() for r in caplog.records if r.name == "bentoml.aegan_serve"]
    assert len(lines) == 1 and "CUDA not used" not in lines[0], lines
    assert lines[0].endswith(f"ONNX Runtime {CUDA} ({app.model.precision}, 1 threads)")
    before = REGISTRY.get_sample_value("aegan_cuda_fallbacks_total")
    stand_in.run_error = "CUDA error: out of memory"
    app.model.generate(np.zeros((2, 32), np.float32))
    assert app.model.provider == CPU and app.info()["runtime"]["cuda_fallbacks"] == 1
    assert REGISTRY.get_sample_value("aegan_cuda_fallbacks_total") == before + 1


def test_non_finite_cuda_output_falls_back_too(stand_in, image_bundle):
    model = ModelRuntime(load_bundle(image_bundle), "auto")
    stand_in.nan_roles = {"encoder"}
    z = model.encode(np.zeros((2, 1, 28, 28), np.float32))
    assert np.isfinite(z).all() and model.provider == CPU
    assert model.cuda_reason == (
        "encoder failed on CUDA: encoder gave non-finite values on CUDA (fp32)"
    )


def runtime_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """The runtime's log lines an operator reads: (level, message)."""
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == runtime.logger.name]


def test_a_fallback_after_start_is_one_warning_with_its_reason_and_no_fp16_gap(
    stand_in, rgb_bundle, caplog
):
    caplog.set_level(logging.INFO, logger=runtime.logger.name)
    model = ModelRuntime(load_bundle(rgb_bundle), "auto")
    assert model.precision == "fp16" and set(model.fp16_error) == {"generator", "encoder"}
    caplog.clear()
    stand_in.run_error = "CUDA error: out of memory"
    model.generate(np.zeros((2, 8), np.float32))
    assert runtime_lines(caplog) == [
        (
            "WARNING",
            "CUDA abandoned, running on CPU from now on: "
            "generator failed on CUDA: CUDA error: out of memory",
        )
    ]
    # what /info shows as fp16_max_abs_error: no gap, as on a worker that never used CUDA
    assert model.fp16_error == {} and model.precision == "fp32"


def test_without_a_driver_auto_says_why_at_info_level_not_as_a_fallback(
    monkeypatch, image_bundle, caplog
):
    monkeypatch.setattr(runtime, "cuda_unavailable_reason", lambda: "no NVIDIA driver here")
    caplog.set_level(logging.INFO, logger=runtime.logger.name)
    reasons: list[str] = []
    model = ModelRuntime(load_bundle(image_bundle), "auto", on_fallback=reasons.append)
    assert model.provider == CPU and model.cuda_reason == "no NVIDIA driver here"
    assert model.fallbacks == 0 and reasons == []
    assert runtime_lines(caplog) == [
        ("INFO", "CUDA not used (no NVIDIA driver here); running on CPU")
    ]
    with pytest.raises(DeviceError) as caught:
        ModelRuntime(load_bundle(image_bundle), "cuda")
    assert str(caught.value) == "AEGAN_DEVICE=cuda but no NVIDIA driver here"
    assert caught.value.gpu_present is False  # no GPU, rather than a GPU that failed


@pytest.mark.parametrize(
    ("creation_error", "library_error", "preload_error", "reason"),
    [
        (None, "", None, NOT_INITIALISED),
        (None, LIBRARY_ERROR, None, f"{NOT_INITIALISED}; {LIBRARY_LINE} | {LIBRARY_LINE}"),
        (
            None,
            LIBRARY_ERROR,
            PRELOAD_ERROR,
            f"{NOT_INITIALISED}; {LIBRARY_LINE} | {LIBRARY_LINE}; {PRELOAD_ERROR}",
        ),
        (
            "CUDA failure 100: no device",
            "",
            None,
            f"{CUDA} failed to start: CUDA failure 100: no device",
        ),
        (
            "CUDA failure 100: no device",
            LIBRARY_ERROR,
            PRELOAD_ERROR,
            f"{CUDA} failed to start: CUDA failure 100: no device; {LIBRARY_LINE}; {PRELOAD_ERROR}",
        ),
    ],
)
def test_cuda_sessions_that_do_not_start_are_a_fallback_saying_why(
    stand_in,
    image_bundle,
    monkeypatch,
    caplog,
    creation_error,
    library_error,
    preload_error,
    reason,
):
    stand_in.creation_error, stand_in.library_error = creation_error, library_error
    stand_in.keeps_cuda = False  # prints library_error when a session is made
    monkeypatch.setattr(runtime, "preload_libraries", lambda: preload_error)
    caplog.set_level(logging.INFO, logger=runtime.logger.name)
    reasons: list[str] = []
    model = ModelRuntime(load_bundle(image_bundle), "auto", on_fallback=reasons.append)
    assert model.provider == CPU and model.cuda_reason == reason and reasons == [reason]
    assert runtime_lines(caplog) == [
        ("WARNING", f"CUDA abandoned, running on CPU from now on: {reason}")
    ]
    with pytest.raises(DeviceError) as caught:
        ModelRuntime(load_bundle(image_bundle), "cuda")
    assert str(caught.value) == f"AEGAN_DEVICE=cuda but {reason}" and caught.value.gpu_present


def test_a_graph_that_fails_in_the_warm_up_is_a_fallback_saying_which(stand_in, image_bundle):
    stand_in.run_error = "CUDA error: out of memory"
    model = ModelRuntime(load_bundle(image_bundle), "auto")
    assert model.provider == CPU and model.fallbacks == 1
    assert model.cuda_reason == "generator does not run on CUDA: CUDA error: out of memory"


@pytest.mark.parametrize(
    ("nan_roles", "offsets", "why"),
    [
        ({"generator.fp16"}, {}, "generator_fp16 gave non-finite values on CUDA (fp16)"),
        (
            set(),
            {"encoder.fp16": 50.0},
            "encoder_fp16 differs from the fp32 graph by 50 (more than 0.1) on CUDA",
        ),
    ],
)
def test_fp16_graphs_set_aside_are_one_warning_saying_why(
    stand_in, rgb_bundle, caplog, nan_roles, offsets, why
):
    stand_in.nan_roles, stand_in.offsets = nan_roles, offsets
    caplog.set_level(logging.INFO, logger=runtime.logger.name)
    model = ModelRuntime(load_bundle(rgb_bundle), "auto")
    assert model.provider == CUDA and model.precision == "fp32" and model.fallbacks == 0
    assert model.fp16_error == {}  # no fp16 graphs in use
    assert runtime_lines(caplog) == [
        ("WARNING", f"fp16 graphs not used on CUDA ({why}); trying the fp32 graphs")
    ]


def test_the_fp16_gap_is_measured_on_a_fixed_batch_of_the_data_range(stand_in, rgb_bundle):
    first = ModelRuntime(load_bundle(rgb_bundle), "auto").fp16_error
    assert ModelRuntime(load_bundle(rgb_bundle), "auto").fp16_error == first  # the same batch
    lowest = min(low for low, _ in stand_in.ranges["encoder.fp16"])
    highest = max(high for _, high in stand_in.ranges["encoder.fp16"])
    assert -1 <= lowest < -0.9 and 0.9 < highest <= 1  # pixels in [-1, 1], all of the range


def test_in_cuda_mode_a_failure_is_an_error_not_a_silent_fallback(stand_in, image_bundle):
    model = ModelRuntime(load_bundle(image_bundle), "cuda")
    stand_in.run_error = "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_EXECUTION_FAILED"):
        model.generate(np.zeros((1, 32), np.float32))
    assert model.provider == CUDA


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_provider_that_never_initialised_is_reported_with_the_library_text(
    stand_in, image_bundle, device
):
    stand_in.keeps_cuda = False
    bundle = load_bundle(image_bundle)
    if device == "cuda":
        with pytest.raises(DeviceError, match="AEGAN_DEVICE=cuda but .*did not initialise"):
            ModelRuntime(bundle, device)
        return
    reasons: list[str] = []
    model = ModelRuntime(bundle, device, on_fallback=reasons.append)
    assert model.provider == CPU and model.fallbacks == 1 and len(reasons) == 1
    assert "libcudnn.so.9: cannot open shared object file" in model.cuda_reason


def test_fp16_graphs_that_fail_on_cuda_give_way_to_the_fp32_graphs(stand_in, rgb_bundle):
    bundle = load_bundle(rgb_bundle)
    model = ModelRuntime(bundle, "auto")
    assert model.provider == CUDA and model.precision == "fp16"
    assert set(model.fp16_error) == {"generator", "encoder"}
    assert all(0 <= e < runtime.FP16_MAX_ABS_ERROR for e in model.fp16_error.values())
    stand_in.nan_roles = {"generator.fp16"}
    model = ModelRuntime(bundle, "auto")
    assert model.provider == CUDA and model.precision == "fp32" and model.fallbacks == 0


def test_gpu_work_of_a_worker_is_serialised(stand_in, image_bundle):
    model = ModelRuntime(load_bundle(image_bundle), "cuda")
    stand_in.most_active, stand_in.delay_s = 0, 0.02
    z = np.zeros((2, 32), np.float32)
    threads = [threading.Thread(target=model.generate, args=(z,)) for _ in range(6)]
    threads += [
        threading.Thread(target=model.encode, args=(np.zeros((2, 1, 28, 28), np.float32),))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stand_in.most_active == 1


def test_without_a_gpu_cuda_is_not_used_and_no_fallback_is_counted(image_bundle):
    reasons: list[str] = []
    model = ModelRuntime(load_bundle(image_bundle), "auto", on_fallback=reasons.append)
    if model.provider == CUDA:
        pytest.skip("CUDA works here")
    assert model.cuda_reason and model.fallbacks == 0 and reasons == []


# --- settings -------------------------------------------------------------------------------------


def test_worker_layout_follows_a_usable_provider_not_device_files(monkeypatch):
    monkeypatch.setattr(config, "available_cpus", lambda: 4)
    monkeypatch.setattr(runtime, "gpu_visible", lambda: True)  # device files, no usable provider
    monkeypatch.setattr(config, "check_in_subprocess", lambda options: "libcudnn.so.9 missing")
    settings = Settings.from_env({})
    assert settings.workers == 4 and settings.batch_size == 64
    assert settings.resources(gpu=False) == {"cpu": "2", "memory": "2Gi"}
    asked: list[CudaOptions] = []
    # the options reach the check in the child process (aegan_core.cuda.check_in_subprocess)
    monkeypatch.setattr(config, "check_in_subprocess", lambda options: asked.append(options))
    environ = {
        "AEGAN_CUDA_TF32": "1",
        "AEGAN_CUDA_ALGO_SEARCH": "exhaustive",
        "AEGAN_CUDA_MEM_LIMIT": "1073741824",
        "AEGAN_CUDA_ARENA": "kNextPowerOfTwo",
    }
    settings = Settings.from_env(environ)
    assert settings.workers == 1 and settings.batch_size == config.GPU_BATCH_SIZE
    assert asked == [
        CudaOptions(algo_search="EXHAUSTIVE", mem_limit=2**30, arena="kNextPowerOfTwo", tf32=True)
    ]
    assert settings.cuda_options() == asked[0]
    assert settings.resources(gpu=True)["gpu"] == 1
    assert settings.largest_batch() == config.GPU_BATCH_SIZE


@pytest.mark.parametrize(
    ("environ", "largest"),
    [
        ({"AEGAN_BATCH_SIZE": "96"}, 96),
        ({"AEGAN_MAX_IMAGES": "100"}, 100),
        ({"AEGAN_MAX_N": "200"}, 200),
        ({"AEGAN_MAX_STEPS": "300"}, 300),
    ],
)
def test_the_largest_batch_is_the_largest_of_a_batch_and_each_request_limit(environ, largest):
    """CUDA warms up every batch size up to it: an encoder batch, or one request's images,
    samples or frames, whichever is largest."""
    settings = Settings.from_env({"AEGAN_DEVICE": "cpu", **environ})
    assert settings.largest_batch() == largest


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AEGAN_CUDA_ALGO_SEARCH": "fast"}, "AEGAN_CUDA_ALGO_SEARCH='FAST' must be one of"),
        ({"AEGAN_CUDA_ARENA": "grow"}, "AEGAN_CUDA_ARENA='grow' must be one of"),
        ({"AEGAN_CUDA_TF32": "on"}, "AEGAN_CUDA_TF32='on' must be 0 or 1"),
        ({"AEGAN_CUDA_MEM_LIMIT": "-1"}, "AEGAN_CUDA_MEM_LIMIT=-1 must be at least 0"),
    ],
)
def test_bad_cuda_settings_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_failures_of_concurrent_requests_are_one_fallback(stand_in, image_bundle):
    reasons: list[str] = []
    model = ModelRuntime(load_bundle(image_bundle), "auto", on_fallback=reasons.append)
    stand_in.run_error, stand_in.delay_s = "CUDA error: an illegal memory access", 0.02
    z = np.zeros((2, 32), np.float32)
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(model.generate(z))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r.shape == (2, 1, 28, 28) for r in results)
    assert model.fallbacks == 1 and len(reasons) == 1 and model.provider == CPU


def test_the_service_declares_a_gpu_where_cuda_is_usable():
    """Imported where the CUDA check says yes (stood in for): one worker, the GPU and the GPU's
    memory in the resources BentoML gets; where it says no, as on this machine, the CPU's."""
    code = (
        "import json, sys\n"
        "from aegan_serve import config\n"
        "if sys.argv[1] == 'usable':\n"
        "    config.cuda_unusable_reason = lambda options: None\n"
        "from aegan_serve.service import AEGAN, CUDA_REASON\n"
        "print(json.dumps([AEGAN.config['resources'], AEGAN.config['workers'], CUDA_REASON]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEGAN_")}
    env["AEGAN_DEVICE"] = "auto"
    found = {}
    for case in ("usable", "as-is"):
        done = subprocess.run(
            [sys.executable, "-c", code, case], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        found[case] = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["usable"] == [{"cpu": "2", "memory": config.GPU_MEMORY, "gpu": 1}, 1, None]
    if cuda.check_in_subprocess() is not None:  # no usable CUDA here
        resources, workers, reason = found["as-is"]
        assert resources == {"cpu": "2", "memory": "2Gi"} and reason
        assert workers == config.available_cpus()


def test_the_gpu_checks_onnx_runtime_steps_rehearsed_with_the_stand_in(stand_in):
    """bench/gpu_check.py's ONNX Runtime steps, on the shipped bundle, against the stand-in CUDA
    provider: their code runs and reports what the runtime saw (not GPU figures)."""
    import importlib.util

    from aegan_core.bundle import DEFAULT_MODEL_DIR

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    ctx = {"bundle": load_bundle(DEFAULT_MODEL_DIR), "ort_cuda_reason": gpu_check.ort_cuda_reason()}
    assert ctx["ort_cuda_reason"] is None  # the service's check passes on the stand-in
    provider = gpu_check.step_ort_provider(ctx)
    assert provider["fp32"]["provider"] == CUDA and provider["fp32"]["io_binding"]
    assert provider["fp16"]["precision"] == "fp16" and provider["fp16"]["fp16_max_abs_error_vs_cpu"]
    parity = gpu_check.step_ort_parity(ctx)
    assert parity["fp32_within_1e-4"] and set(parity) >= {"fp32", "fp32_tf32", "fp16"}
    cold = gpu_check.step_ort_cold_start(ctx)
    assert set(cold) == {
        f"{role}-{search}"
        for role in ("generator", "encoder")
        for search in ("HEURISTIC", "EXHAUSTIVE")
    }
    assert set(cold["encoder-EXHAUSTIVE"]) == {str(n) for n in gpu_check.BATCH_SIZES}
    assert {o["cudnn_conv_algo_search"] for o in stand_in.options} >= {"HEURISTIC", "EXHAUSTIVE"}


def test_a_failures_parts_are_joined_in_order_without_the_empty_ones():
    from aegan_core.cuda import _joined

    assert _joined("CUDA failed to start: x", None, "", "libcudnn missing") == (
        "CUDA failed to start: x; libcudnn missing"
    )
