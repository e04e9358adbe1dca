"""Export parity checks (export/onnx_export.py) on hand-built graphs with a known error: a graph
that adds ``offset`` to its input is compared with the identity, so the measured error is the
offset and the verdict follows from the tolerance alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import (
    CPU,
    CUDA,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    PARITY_BATCHES,
    ParityError,
    check_fp16,
    check_fp32,
    max_abs_error,
    probe_inputs,
    session,
)


def _offset_graph(offset: float, fp16: bool, width: int = 4) -> onnx.ModelProto:
    """y = x + offset, computed in float16 between float32 casts when ``fp16``."""
    dtype = np.float16 if fp16 else np.float32
    nodes = [helper.make_node("Add", ["xh" if fp16 else "x", "c"], ["yh" if fp16 else "y"])]
    if fp16:
        nodes.insert(0, helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "offset",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(np.array(offset, dtype), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _inputs(scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.uniform(-1, 1, (b, 4)) * scale).astype(np.float32) for b in PARITY_BATCHES]


def test_fp32_error_is_measured_and_bounded():
    inputs = _inputs()
    exact = check_fp32(_offset_graph(0.0, False), "g.onnx", "x", inputs, inputs)
    assert exact.max_abs_error == {CPU: 0.0} and exact.tolerance == FP32_TOLERANCE
    # 5e-5 is half the tolerance; float32 rounding of x + 5e-5 adds at most 6e-8.
    close = check_fp32(_offset_graph(5e-5, False), "g.onnx", "x", inputs, inputs)
    assert close.max_abs_error[CPU] == pytest.approx(5e-5, abs=1e-6)
    with pytest.raises(ParityError, match=r"g\.onnx: parity check failed on CPUExecutionProvider"):
        check_fp32(_offset_graph(2e-4, False), "g.onnx", "x", inputs, inputs)


def test_fp16_within_tolerance_is_measured_on_the_cpu_not_skipped():
    inputs = _inputs()
    result = check_fp16(_offset_graph(0.0, True), "g.fp16.onnx", "x", inputs, inputs)
    assert result.dtype == "float16" and result.tolerance == FP16_TOLERANCE  # outputs within 1
    assert CPU in result.max_abs_error and CPU not in result.skipped
    # float16 rounding of values in [-1, 1]: at most half a unit in the last place, 2**-12
    assert 0 < result.max_abs_error[CPU] <= 2**-12
    # CUDA is measured on a GPU machine and skipped, with the reason, elsewhere
    assert (CUDA in result.max_abs_error) != (CUDA in result.skipped)
    assert all(e <= result.tolerance for e in result.max_abs_error.values())


@pytest.mark.parametrize("offset", [0.05, float("inf")])
def test_fp16_failure_raises_instead_of_being_skipped(offset):
    inputs = _inputs()
    with pytest.raises(ParityError, match=r"g\.fp16\.onnx: parity check failed on \w+Provider"):
        check_fp16(_offset_graph(offset, True), "g.fp16.onnx", "x", inputs, inputs)


def test_fp16_tolerance_scales_with_the_outputs():
    """Outputs up to 40 allow 40 times the error: an offset of 0.05 passes at that scale (0.4)."""
    inputs = _inputs(scale=40.0)
    result = check_fp16(_offset_graph(0.05, True), "g.fp16.onnx", "x", inputs, inputs)
    scale = max(float(np.abs(x).max()) for x in inputs)
    assert result.tolerance == pytest.approx(FP16_TOLERANCE * scale)
    # 0.05 plus float16 rounding at magnitude 40 (half a unit in the last place: 2**-6)
    assert result.max_abs_error[CPU] == pytest.approx(0.05, abs=2**-6 + 1e-3)


def test_wrong_output_shape_is_a_parity_failure():
    inputs = _inputs()
    refs = [x[:, :2] for x in inputs]
    with pytest.raises(ParityError, match=r"output shape \(1, 4\) differs from PyTorch's \(1, 2\)"):
        check_fp16(_offset_graph(0.0, True), "g.fp16.onnx", "x", inputs, refs)
    with pytest.raises(ParityError, match=r"output shape"):
        check_fp32(_offset_graph(0.0, False), "g.onnx", "x", inputs, refs)


def test_a_graph_a_provider_cannot_run_is_skipped_with_the_reason():
    model = _offset_graph(0.0, True)
    model.graph.node[1].op_type = "NoSuchOp"  # loads nowhere
    inputs = _inputs()
    result = check_fp16(model, "g.fp16.onnx", "x", inputs, inputs)
    assert CPU not in result.max_abs_error
    assert result.skipped[CPU].startswith("cannot run here: ")
    assert "NoSuchOp" in result.skipped[CPU] and len(result.skipped[CPU]) <= 500


class _Constant(torch.nn.Module):
    """A generator whose every sample is ``value`` (shape ``shape``)."""

    def __init__(self, shape: tuple[int, ...], value: float) -> None:
        super().__init__()
        self.shape, self.value = shape, value

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full((len(z), *self.shape), self.value)


def test_probe_inputs_mix_samples_with_off_manifold_noise():
    latents, data = probe_inputs(_Constant((1, 4, 4), 0.25), 3, "image")
    assert [len(z) for z in latents] == list(PARITY_BATCHES) and latents[0].shape == (1, 3)
    big = data[-1]  # batch 64: 32 samples of G, then 32 images of uniform noise in [-1, 1]
    assert (big[:32] == 0.25).all()
    noise = big[32:]
    assert -1 <= noise.min() < -0.9 and 0.9 < noise.max() <= 1 and abs(noise.mean()) < 0.05
    _, vectors = probe_inputs(_Constant((5,), 2.0), 3, "vector")
    spread = vectors[-1][32:]  # Gaussian noise of the samples' scale: std(samples) + 1e-3
    assert (vectors[-1][:32] == 2.0).all() and 0.8e-3 < spread.std() < 1.2e-3


def test_max_abs_error_needs_one_reference_per_batch():
    inputs = _inputs()
    sess = session(_offset_graph(0.5, False), CPU)
    assert max_abs_error(sess, "x", inputs, inputs) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError):
        max_abs_error(sess, "x", inputs, inputs[:2])
