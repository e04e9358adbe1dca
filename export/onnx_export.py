"""PyTorch networks -> ONNX graphs, their fp16 variants, and the parity checks that vouch for both.

Exporter: ``torch.onnx.export(..., dynamo=True)``. It is torch's default and maintained path; the
TorchScript-based exporter is legacy (its options are deprecated). The dynamo exporter captures
the network with ``torch.export``, so the batch dimension is declared once as a symbol
(``dynamic_shapes``) and checked by torch's shape guards rather than inferred from a trace, and it
runs the onnxscript optimiser (constant folding, dead-code removal) on the result.

Parity: every graph is run by ONNX Runtime on fixed inputs at several batch sizes and compared with
the PyTorch network it came from. A graph that disagrees beyond its tolerance raises
:class:`ParityError`, naming the graph, the execution provider and the error.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from aegan_core.cuda import CudaOptions, preload_libraries
from aegan_core.errors import UserError
from aegan_core.runtime import Providers, cuda_unavailable_reason, open_session

OPSET = 18  # ONNX opset of every graph; ONNX Runtime >= 1.14 runs it.
EXPORTER = "torch.onnx.export(dynamo=True)"
PARITY_BATCHES = (1, 7, 64)  # Batch sizes every parity check runs (the batch axis is dynamic).
EXAMPLE_BATCH = 2  # Batch of the example input traced at export (>= 2: torch specialises 0 and 1).
FP32_TOLERANCE = 1e-4  # Max abs error of fp32 graphs against PyTorch (fp32 on both sides).
# Max abs error of fp16 graphs, per unit of output scale: the bound is FP16_TOLERANCE * max(1,
# max |reference|). float16 keeps 11 significant bits (unit roundoff 2**-11 ~ 4.9e-4); a handful of
# layers, each rounding its activations and summing hundreds of products, gives errors of a few
# 1e-4 to 1e-3 on [-1, 1] outputs. 1e-2 is about 20 roundoffs and 1.3 of 255 grey levels: loose
# enough for honest fp16 rounding, tight enough to catch overflow, a wrong cast or a broken op.
# Latents and vectors are not bounded by 1, hence the scale.
FP16_TOLERANCE = 1e-2

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ExportError(UserError, RuntimeError):
    """An export cannot proceed, or what it produced is not fit to ship; the message says why."""


class ParityError(ExportError):
    """An exported graph disagrees with its PyTorch network beyond tolerance."""


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's chatter (optional torchvision ops, deprecations); errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def export_graph(
    net: nn.Module, example: torch.Tensor, input_name: str, output_name: str, graph_name: str
) -> onnx.ModelProto:
    """Export ``net`` (put in eval mode) as one self-contained graph with a dynamic batch axis.

    ``example`` must have a batch of at least 2; the graph is checked with ``full_check=True``.
    """
    if example.shape[0] < 2:
        raise ValueError("export needs an example batch of at least 2 (torch specialises 0 and 1)")
    net.eval()  # batch norm uses its running statistics; the graph must not depend on the batch
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    if program is None:  # torch.onnx.export answers None only for the legacy exporter
        raise RuntimeError(f"the ONNX export of {graph_name} returned no program")
    model = program.model_proto
    model.graph.name = graph_name
    onnx.checker.check_model(model, full_check=True)
    return model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computed in float16, with float32 inputs and outputs (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # weights clamped to the fp16 range are expected
        half = convert_float_to_float16(copy, keep_io_types=True)
    _sort_topologically(half.graph)  # the converter appends its input casts after their users
    onnx.checker.check_model(half, full_check=True)
    return half


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder the nodes so that each comes after the producers of its inputs (stable)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        still = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                still.append(node)
        if len(still) == len(pending):
            raise ValueError(f"graph {graph.name!r} has a cycle or a dangling input")
        pending = still
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


# --- parity ---------------------------------------------------------------------------------


@dataclass
class ParityResult:
    """Measured parity of one graph: max abs error per provider, or why a provider was skipped."""

    dtype: str
    tolerance: float
    max_abs_error: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "max_abs_error": self.max_abs_error,
        }
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def probe_inputs(
    generator: nn.Module, latent_dim: int, kind: str, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fixed parity inputs, one array per batch in :data:`PARITY_BATCHES`: latents z ~ N(0, I) for
    G; for E, G's own samples (on the model's data manifold) mixed with off-manifold inputs
    (uniform noise in [-1, 1] for images, Gaussian noise of the samples' scale for vectors)."""
    rng = np.random.default_rng(seed)
    latents, data = [], []
    generator.eval()
    for batch in PARITY_BATCHES:
        z = rng.standard_normal((batch, latent_dim)).astype(np.float32)
        with torch.no_grad():
            samples = generator(torch.from_numpy(z)).numpy()
        n_noise = batch // 2
        if kind == "image":
            noise = rng.uniform(-1.0, 1.0, samples.shape).astype(np.float32)
        else:
            noise = (rng.standard_normal(samples.shape) * (samples.std() + 1e-3)).astype(np.float32)
        mixed = samples.copy()
        mixed[batch - n_noise :] = noise[batch - n_noise :]
        latents.append(z)
        data.append(mixed)
    return latents, data


def torch_outputs(net: nn.Module, inputs: list[np.ndarray]) -> list[np.ndarray]:
    net.eval()
    with torch.no_grad():
        return [net(torch.from_numpy(x)).numpy() for x in inputs]


def session(model: onnx.ModelProto, provider: str) -> ort.InferenceSession:
    """An ONNX Runtime session on exactly ``provider`` (raises if it cannot be created there)."""
    providers: Providers = [provider]
    if provider == CUDA:  # the service's CUDA settings: libraries preloaded, TF32 off
        preload_libraries()
        providers = [(CUDA, CudaOptions().provider_options())]
    sess = open_session(model.SerializeToString(), providers, quiet=True)
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"ONNX Runtime could not create the {provider} (missing libraries?)")
    return sess


def max_abs_error(
    sess: ort.InferenceSession, input_name: str, inputs: list[np.ndarray], refs: list[np.ndarray]
) -> float:
    """Largest |ONNX Runtime - PyTorch| over all batches; inf when either side is not finite."""
    worst = 0.0
    for x, ref in zip(inputs, refs, strict=True):
        (got,) = sess.run(None, {input_name: x})
        if got.shape != ref.shape:
            raise ParityError(f"output shape {got.shape} differs from PyTorch's {ref.shape}")
        if not (np.isfinite(got).all() and np.isfinite(ref).all()):
            return float("inf")
        worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max()))
    return worst


def check_fp32(
    model: onnx.ModelProto,
    graph: str,
    input_name: str,
    inputs: list[np.ndarray],
    refs: list[np.ndarray],
) -> ParityResult:
    """fp32 graph on the CPU provider against PyTorch; raises :class:`ParityError` beyond
    :data:`FP32_TOLERANCE`."""
    result = ParityResult("float32", FP32_TOLERANCE)
    try:
        sess = session(model, CPU)
    except Exception as exc:
        raise ExportError(f"{graph}: ONNX Runtime cannot load it on {CPU}: {exc}") from exc
    try:
        error = max_abs_error(sess, input_name, inputs, refs)
    except ParityError as exc:
        raise ParityError(f"{graph}: parity check failed on {CPU}: {exc}") from exc
    _require(graph, CPU, error, FP32_TOLERANCE)
    result.max_abs_error[CPU] = error
    return result


def check_fp16(
    model: onnx.ModelProto,
    graph: str,
    input_name: str,
    inputs: list[np.ndarray],
    refs: list[np.ndarray],
) -> ParityResult:
    """fp16 graph against the fp32 PyTorch network, on CUDA when a GPU is usable and on the CPU
    provider when it can run the graph; a provider that cannot is skipped with the reason."""
    scale = max(1.0, max(float(np.abs(r).max()) for r in refs))
    tolerance = FP16_TOLERANCE * scale
    result = ParityResult("float16", tolerance)
    reason = cuda_unavailable_reason()
    for provider in (CUDA, CPU):
        if provider == CUDA and reason is not None:
            result.skipped[CUDA] = reason
            continue
        try:
            sess = session(model, provider)
            error = max_abs_error(sess, input_name, inputs, refs)
        except ParityError as exc:
            raise ParityError(f"{graph}: parity check failed on {provider}: {exc}") from exc
        except Exception as exc:  # ORT lacks some fp16 kernels on some providers
            result.skipped[provider] = f"cannot run here: {type(exc).__name__}: {exc}"[:500]
            continue
        _require(graph, provider, error, tolerance)
        result.max_abs_error[provider] = error
    return result


def _require(graph: str, provider: str, error: float, tolerance: float) -> None:
    if not error <= tolerance:
        raise ParityError(
            f"{graph}: parity check failed on {provider}: max abs error {error:.3g} against the "
            f"PyTorch EMA network exceeds {tolerance:.3g} (batches {list(PARITY_BATCHES)})"
        )
