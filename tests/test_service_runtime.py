"""ONNX Runtime sessions, device choice, settings from the environment and bundle resolution."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bundle_factory import tamper, write_bundle
from onnx import TensorProto, helper, numpy_helper
from service_helpers import serve

from aegan_core import runtime
from aegan_core.bundle import (
    DATA_TENSOR,
    ENCODER,
    FILE_NAMES,
    GENERATOR,
    LATENT_TENSOR,
    MANIFEST_NAME,
    BundleError,
    file_entry,
    load_bundle,
    resolve_bundle_dir,
    write_manifest,
)
from aegan_core.runtime import CPU, CUDA, DeviceError, ModelRuntime, available_cpus
from aegan_serve import config
from aegan_serve.config import Settings, SettingsError


def cuda_works(bundle: Path) -> bool:
    if CUDA not in ort.get_available_providers():
        return False
    try:
        return ModelRuntime(load_bundle(bundle), "cuda").provider == CUDA
    except DeviceError:
        return False


def test_cpu_sessions_run_both_graphs(image_bundle):
    runtime = ModelRuntime(load_bundle(image_bundle), "cpu", threads=1)
    assert runtime.provider == CPU and runtime.precision == "fp32"
    for graph in (runtime.generator, runtime.encoder):
        assert graph.session.get_providers() == [CPU]
        assert graph.device_id is None  # run without IO binding
        assert graph.session.get_session_options().intra_op_num_threads == 1
    x = runtime.generate(np.zeros((3, 32), np.float32))
    assert x.shape == (3, 1, 28, 28)
    assert runtime.encode(x).shape == (3, 32)


def test_auto_uses_the_provider_that_actually_initialised(image_bundle):
    runtime = ModelRuntime(load_bundle(image_bundle), "auto")
    assert runtime.provider in runtime.generator.session.get_providers()
    assert runtime.provider == (CUDA if cuda_works(image_bundle) else CPU)


def test_cuda_required_but_unusable_stops_with_a_clear_error(image_bundle):
    if cuda_works(image_bundle):
        pytest.skip("CUDA works here")
    with pytest.raises(DeviceError, match="AEGAN_DEVICE=cuda but"):
        ModelRuntime(load_bundle(image_bundle), "cuda")


def test_fp16_graphs_are_for_cuda_only(rgb_bundle):
    bundle = load_bundle(rgb_bundle)
    assert bundle.has("generator_fp16")
    runtime = ModelRuntime(bundle, "cpu")
    assert runtime.precision == "fp32"
    assert runtime.generator.session._model_path.endswith("generator.onnx")


def test_bundle_whose_graphs_disagree_with_the_manifest_is_refused(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["data_shape"] = [1, 32, 32]
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="do not run on the manifest's shapes|generator gives"):
        ModelRuntime(load_bundle(bundle), "cpu")


def _with_graph(
    bundle: Path, role: str, nodes: list, inits: list, in_dim: int, out_dim: int, before=()
):
    """``bundle`` with its ``role`` graph replaced by a flat one (batch, in_dim) -> (batch, out_dim)
    built from ``nodes``, and the manifest's entry for it rewritten to match; ``before``: names of
    more (batch, in_dim) outputs, listed ahead of the one the manifest names."""
    inp, outp = (LATENT_TENSOR, DATA_TENSOR) if role == GENERATOR else (DATA_TENSOR, LATENT_TENSOR)
    extra = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", in_dim]) for n in before]
    graph = helper.make_graph(
        nodes,
        role,
        [helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["batch", in_dim])],
        [*extra, helper.make_tensor_value_info(outp, TensorProto.FLOAT, ["batch", out_dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, bundle / FILE_NAMES[role])
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["files"][role] = file_entry(bundle, role, inp, outp)
    write_manifest(bundle, manifest)
    return bundle


def test_image_bundles_need_one_or_three_channels(tmp_path):
    bundle = write_bundle(tmp_path / "b", shape=(2, 8, 8))  # graphs that agree with the manifest
    with pytest.raises(BundleError) as refused:
        ModelRuntime(load_bundle(bundle), "cpu")
    assert str(refused.value) == (
        f"{bundle}: image bundles need data_shape (C, H, W) with C = 1 or 3, got (2, 8, 8)"
    )


def test_a_generator_that_runs_but_gives_another_shape_is_refused_naming_both(tmp_path):
    bundle = write_bundle(tmp_path / "b", kind="vector", shape=(16,), latent_dim=4)
    weight = numpy_helper.from_array(np.ones((4, 8), np.float32), "W")
    _with_graph(
        bundle,
        GENERATOR,
        [helper.make_node("MatMul", [LATENT_TENSOR, "W"], [DATA_TENSOR])],
        [weight],
        4,
        8,
    )
    with pytest.raises(BundleError) as refused:
        ModelRuntime(load_bundle(bundle), "cpu")
    assert str(refused.value) == (
        f"{bundle}: generator gives (8,) (manifest data_shape (16,)), encoder gives (4,) "
        "(manifest latent_dim 4)"
    )


@pytest.mark.parametrize("role", [GENERATOR, ENCODER])
def test_a_graph_that_is_not_finite_on_zeros_is_refused(tmp_path, role):
    bundle = write_bundle(tmp_path / "b", kind="vector", shape=(4,), latent_dim=4)
    inp, outp = (LATENT_TENSOR, DATA_TENSOR) if role == GENERATOR else (DATA_TENSOR, LATENT_TENSOR)
    _with_graph(bundle, role, [helper.make_node("Reciprocal", [inp], [outp])], [], 4, 4)  # 1/0
    with pytest.raises(BundleError) as refused:
        ModelRuntime(load_bundle(bundle), "cpu")
    assert str(refused.value) == f"{bundle}: graphs produce non-finite values on zeros"


def test_graphs_take_any_real_numbers_as_float32(image_bundle):
    cpu = ModelRuntime(load_bundle(image_bundle), "cpu")
    z = np.random.default_rng(0).standard_normal((3, 32))  # float64
    x = cpu.generator.run(z)
    assert x.dtype == np.float32 and x.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(x, cpu.generator.run(z.astype(np.float32)))
    assert cpu.encoder.run(x.astype(np.float64).tolist()).shape == (3, 32)


def test_a_graph_gives_the_output_its_manifest_names_among_others(tmp_path):
    bundle = write_bundle(tmp_path / "b", kind="vector", shape=(8,), latent_dim=4)
    nodes = [
        helper.make_node("Identity", [LATENT_TENSOR], ["debug"]),
        helper.make_node("MatMul", [LATENT_TENSOR, "W"], [DATA_TENSOR]),
    ]
    weight = np.arange(32, dtype=np.float32).reshape(4, 8)
    inits = [numpy_helper.from_array(weight, "W")]
    _with_graph(bundle, GENERATOR, nodes, inits, 4, 8, before=["debug"])
    cpu = ModelRuntime(load_bundle(bundle), "cpu")
    z = np.eye(4, dtype=np.float32)
    np.testing.assert_array_equal(cpu.generate(z), weight)


def test_service_refuses_a_tampered_or_missing_bundle(tmp_path):
    bundle = write_bundle(tmp_path / "tampered")
    tamper(bundle)
    altered = pytest.raises(BundleError, match="generator.onnx does not match its manifest")
    with altered, serve(bundle):
        pass
    missing = pytest.raises(BundleError, match="neither a bundle directory nor a model")
    with missing, serve(tmp_path / "missing"):
        pass


def test_model_store_tags_resolve_to_the_stored_bundle(image_bundle):
    import bentoml

    with bentoml.models.create("aegan-resolve-test") as model:
        for item in image_bundle.iterdir():
            shutil.copy2(item, Path(model.path) / item.name)
    tag = str(model.tag)
    for spec in (f"bentoml:{tag}", "bentoml:aegan-resolve-test", "aegan-resolve-test:latest"):
        assert load_bundle(resolve_bundle_dir(spec)).name == "tiny-test"
    assert resolve_bundle_dir(image_bundle) == image_bundle
    with pytest.raises(BundleError, match="not in the BentoML model store"):
        resolve_bundle_dir("bentoml:no-such-model")


def test_settings_defaults_and_overrides(monkeypatch):
    monkeypatch.setattr(config, "gpu_usable", lambda options: False)
    monkeypatch.setattr(config, "available_cpus", lambda: 4)
    settings = Settings.from_env({})  # on the CPU: one worker per CPU, one thread each
    assert settings.device == "auto" and settings.workers == 4 and settings.threads == 1
    assert settings.fp16 and settings.batch_size == 64 and settings.max_queue == 1024
    monkeypatch.setattr(config, "gpu_usable", lambda options: True)
    settings = Settings.from_env({})  # a GPU: one worker (one CUDA context) with all the threads
    assert settings.workers == 1 and settings.threads == 4
    assert Settings.from_env({"AEGAN_DEVICE": "cpu"}).workers == 4  # unless told to use the CPU
    monkeypatch.undo()
    assert settings.model.endswith("models/fashion-mnist")
    declared = config.Environment.model_fields
    assert asdict(settings.limits) == {k: declared[k].default for k in asdict(settings.limits)}
    env = {
        "AEGAN_DEVICE": "CPU",
        "AEGAN_WORKERS": "2",
        "AEGAN_MAX_N": "8",
        "AEGAN_MAX_UPLOAD_BYTES": "1_000",
        "AEGAN_FP16": "0",
        "AEGAN_MODEL": "bentoml:x",
    }
    settings = Settings.from_env(env)
    assert settings.device == "cpu" and settings.workers == 2 and not settings.fp16
    assert settings.threads == max(1, available_cpus() // 2)
    assert settings.limits.max_n == 8 and settings.limits.max_upload_bytes == 1000
    assert settings.model == "bentoml:x"


def test_sessions_keep_to_the_threads_they_are_given_and_do_not_spin(image_bundle):
    options = runtime.session_options(3)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    model = str(load_bundle(image_bundle).file("generator"))
    made = runtime.open_session(model, [CPU]).get_session_options()
    assert made.intra_op_num_threads == 0  # ONNX Runtime's default
    assert made.log_severity_level == ort.SessionOptions().log_severity_level  # warnings shown
    made = runtime.open_session(model, [CPU], 2, quiet=True).get_session_options()
    assert made.intra_op_num_threads == 2 and made.log_severity_level == 3  # errors only
    assert made.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # a runtime's CPU sessions run on one thread unless told otherwise
    cpu = ModelRuntime(load_bundle(image_bundle), "cpu")
    assert cpu.encoder.session.get_session_options().intra_op_num_threads == 1


def test_gpu_visible_looks_for_an_nvidia_device_node(monkeypatch, tmp_path):
    nodes = (str(tmp_path / "nvidiactl"), str(tmp_path / "nvidia0"))
    monkeypatch.setattr(runtime, "NVIDIA_DEVICE_NODES", nodes)
    assert not runtime.gpu_visible()
    (tmp_path / "nvidia0").touch()
    assert runtime.gpu_visible()


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", 8), ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("", 8)],
)
def test_available_cpus_honours_a_cgroup_cpu_quota(monkeypatch, tmp_path, cpu_max, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert runtime.available_cpus() == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"AEGAN_MAX_IMAGES": "64", "AEGAN_MAX_QUEUE": "63"},
            "AEGAN_MAX_QUEUE=63 must be at least",
        ),
        ({"AEGAN_DEVICE": "gpu"}, "AEGAN_DEVICE='gpu' must be one of auto, cuda, cpu"),
        ({"AEGAN_MAX_N": "many"}, "AEGAN_MAX_N='many' is not an integer"),
        ({"AEGAN_MAX_IMAGES": "0"}, "AEGAN_MAX_IMAGES=0 must be at least 1"),
        ({"AEGAN_MAX_STEPS": "1"}, "AEGAN_MAX_STEPS=1 must be at least 2"),
        ({"AEGAN_THREADS": "-2"}, "AEGAN_THREADS=-2 must be at least 1"),
        ({"AEGAN_FP16": "yes"}, "AEGAN_FP16='yes' must be 0 or 1"),
    ],
)
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_the_service_imports_no_torch():
    code = "import sys, aegan_serve.service; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda entry, root: entry.update(path=5), "path: Input should be a valid string"),
        (lambda entry, root: entry.update(path=""), "path '' is not a file name"),
        (lambda entry, root: entry.update(path="../encoder.onnx"), "is outside the bundle"),
        (lambda entry, root: entry.update(path=str(root / "encoder.onnx")), "outside the bundle"),
    ],
    ids=["number", "empty", "parent", "absolute"],
)
def test_manifest_paths_that_are_not_plain_file_names_are_refused(
    image_bundle, tmp_path, edit, message
):
    bundle = tmp_path / "bundle"
    shutil.copytree(image_bundle, bundle)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    edit(manifest["files"]["encoder"], bundle)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"entry for 'encoder'.*{message}"):
        load_bundle(bundle)


def test_a_graph_that_is_a_symbolic_link_is_refused(image_bundle, tmp_path):
    """Even to the very bytes the manifest hashed: a link can point anywhere, and change after
    the check."""
    bundle = tmp_path / "bundle"
    shutil.copytree(image_bundle, bundle)
    elsewhere = tmp_path / "elsewhere.onnx"
    (bundle / "encoder.onnx").rename(elsewhere)
    (bundle / "encoder.onnx").symlink_to(elsewhere)
    with pytest.raises(BundleError, match="'encoder.onnx' is a symbolic link"):
        load_bundle(bundle)


def test_available_cpus_counts_the_cpus_where_there_is_no_affinity(monkeypatch, tmp_path):
    monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    (tmp_path / "cpu.max").write_text("400000 100000")
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert runtime.available_cpus() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undetermined"
    assert runtime.available_cpus() == 1
