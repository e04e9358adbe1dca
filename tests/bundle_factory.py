"""Write small but real model bundles (ONNX graphs built with ``onnx.helper``) for tests.

Image bundles: generator ``x = tanh(reshape(z @ W))``; encoder ``z = atanh(clip(x)) @ pinv(W)``, so
the encoder inverts the generator on its own samples and ``decode(encode(G(z))) ~= G(z)``.
Vector bundles: generator ``x = z @ W``; encoder ``z = x @ pinv(W)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aegan_core.bundle import (
    DATA_TENSOR,
    ENCODER,
    ENCODER_FP16,
    FILE_NAMES,
    FORMAT_VERSION,
    GENERATOR,
    GENERATOR_FP16,
    LATENT_TENSOR,
    file_entry,
    write_manifest,
)

OPSET = 18
CLIP = 0.99  # the encoder clips pixels before atanh so that +-1 stays finite


def _model(nodes: list, inputs: list, outputs: list, inits: list, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _cast_wrapped(nodes: list, inits: list, first_input: str, last_output: str) -> list:
    """fp16 variant: the same graph computed in float16 with float32 inputs and outputs."""
    for init in inits:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
            )
    renamed = []
    for node in nodes:
        node.input[:] = [f"{n}_h" if n == first_input else n for n in node.input]
        node.output[:] = [f"{n}_h" if n == last_output else n for n in node.output]
        renamed.append(node)
    return [
        helper.make_node("Cast", [first_input], [f"{first_input}_h"], to=TensorProto.FLOAT16),
        *renamed,
        helper.make_node("Cast", [f"{last_output}_h"], [last_output], to=TensorProto.FLOAT),
    ]


def _image_graphs(shape: tuple[int, int, int], latent_dim: int, weight: np.ndarray, fp16: bool):
    c, h, w = shape
    pinv = np.linalg.pinv(weight).astype(np.float32)
    g_inits = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(np.array([-1, c, h, w], np.int64), "shape"),
    ]
    g_nodes = [
        helper.make_node("MatMul", [LATENT_TENSOR, "W"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["pre"]),
        helper.make_node("Tanh", ["pre"], [DATA_TENSOR]),
    ]
    e_inits = [
        numpy_helper.from_array(pinv, "W_inv"),
        numpy_helper.from_array(np.array(-CLIP, np.float32), "lo"),
        numpy_helper.from_array(np.array(CLIP, np.float32), "hi"),
    ]
    e_nodes = [
        helper.make_node("Clip", [DATA_TENSOR, "lo", "hi"], ["clipped"]),
        helper.make_node("Atanh", ["clipped"], ["pre"]),
        helper.make_node("Flatten", ["pre"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W_inv"], [LATENT_TENSOR]),
    ]
    if fp16:
        g_nodes = _cast_wrapped(g_nodes, g_inits, LATENT_TENSOR, DATA_TENSOR)
        e_nodes = _cast_wrapped(e_nodes, e_inits, DATA_TENSOR, LATENT_TENSOR)
    z_info = helper.make_tensor_value_info(LATENT_TENSOR, TensorProto.FLOAT, ["batch", latent_dim])
    x_info = helper.make_tensor_value_info(DATA_TENSOR, TensorProto.FLOAT, ["batch", c, h, w])
    generator = _model(g_nodes, [z_info], [x_info], g_inits, "generator")
    encoder = _model(e_nodes, [x_info], [z_info], e_inits, "encoder")
    return generator, encoder


def _vector_graphs(dim: int, latent_dim: int, weight: np.ndarray):
    pinv = np.linalg.pinv(weight).astype(np.float32)
    z_info = helper.make_tensor_value_info(LATENT_TENSOR, TensorProto.FLOAT, ["batch", latent_dim])
    x_info = helper.make_tensor_value_info(DATA_TENSOR, TensorProto.FLOAT, ["batch", dim])
    generator = _model(
        [helper.make_node("MatMul", [LATENT_TENSOR, "W"], [DATA_TENSOR])],
        [z_info],
        [x_info],
        [numpy_helper.from_array(weight, "W")],
        "generator",
    )
    encoder = _model(
        [helper.make_node("MatMul", [DATA_TENSOR, "W_inv"], [LATENT_TENSOR])],
        [x_info],
        [z_info],
        [numpy_helper.from_array(pinv, "W_inv")],
        "encoder",
    )
    return generator, encoder


def write_bundle(
    out: Path,
    *,
    kind: str = "image",
    shape: tuple[int, ...] = (1, 28, 28),
    latent_dim: int = 32,
    name: str = "tiny-test",
    fp16: bool = False,
    seed: int = 0,
    prior: str = "normal",
) -> Path:
    """Write a bundle into ``out`` (created) and return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    # Small weights keep tanh away from saturation, so atanh in the encoder stays well conditioned.
    weight = (rng.standard_normal((latent_dim, size)) * 0.35 / math.sqrt(latent_dim)).astype(
        np.float32
    )
    graphs: dict[str, onnx.ModelProto] = {}
    if kind == "image":
        graphs[GENERATOR], graphs[ENCODER] = _image_graphs(shape, latent_dim, weight, False)
        if fp16:
            graphs[GENERATOR_FP16], graphs[ENCODER_FP16] = _image_graphs(
                shape, latent_dim, weight, True
            )
    else:
        graphs[GENERATOR], graphs[ENCODER] = _vector_graphs(shape[0], latent_dim, weight)
    files = {}
    for role, model in graphs.items():
        onnx.save(model, out / FILE_NAMES[role])
        is_generator = role in (GENERATOR, GENERATOR_FP16)
        inp, outp = (LATENT_TENSOR, DATA_TENSOR) if is_generator else (DATA_TENSOR, LATENT_TENSOR)
        files[role] = file_entry(out, role, inp, outp)
    write_manifest(
        out,
        {
            "format_version": FORMAT_VERSION,
            "name": name,
            "kind": kind,
            "data_shape": list(shape),
            "latent_dim": latent_dim,
            "latent_prior": prior,
            "pixel_range": [-1.0, 1.0],
            "files": files,
            "opset": OPSET,
            "training_config": {"arch": "test"},
            "metrics": {"recon_mse": 0.01},
        },
    )
    return out


def tamper(bundle_dir: Path, role: str = GENERATOR) -> None:
    """Flip one byte of a graph file so that its hash no longer matches the manifest."""
    path = Path(bundle_dir) / FILE_NAMES[role]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def write_offset_bundle(
    out: Path, offset: float, shape: tuple[int, int, int] = (1, 28, 28)
) -> Path:
    """An image bundle whose reconstruction error is known: E flattens the image (z = x, so
    latent_dim = C*H*W) and G adds ``offset`` to every pixel, so G(E(x)) = x + offset."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c, h, w = shape
    size = math.prod(shape)
    z_info = helper.make_tensor_value_info(LATENT_TENSOR, TensorProto.FLOAT, ["batch", size])
    x_info = helper.make_tensor_value_info(DATA_TENSOR, TensorProto.FLOAT, ["batch", c, h, w])
    generator = _model(
        [
            helper.make_node("Reshape", [LATENT_TENSOR, "shape"], ["image"]),
            helper.make_node("Add", ["image", "offset"], [DATA_TENSOR]),
        ],
        [z_info],
        [x_info],
        [
            numpy_helper.from_array(np.array([-1, c, h, w], np.int64), "shape"),
            numpy_helper.from_array(np.array(offset, np.float32), "offset"),
        ],
        "generator",
    )
    encoder = _model(
        [helper.make_node("Flatten", [DATA_TENSOR], [LATENT_TENSOR], axis=1)],
        [x_info],
        [z_info],
        [],
        "encoder",
    )
    files = {}
    for role, model, io in (
        (GENERATOR, generator, (LATENT_TENSOR, DATA_TENSOR)),
        (ENCODER, encoder, (DATA_TENSOR, LATENT_TENSOR)),
    ):
        onnx.save(model, out / FILE_NAMES[role])
        files[role] = file_entry(out, role, *io)
    write_manifest(
        out,
        {
            "format_version": FORMAT_VERSION,
            "name": "offset-test",
            "kind": "image",
            "data_shape": list(shape),
            "latent_dim": size,
            "latent_prior": "normal",
            "pixel_range": [-1.0, 1.0],
            "files": files,
            "opset": OPSET,
        },
    )
    return out
