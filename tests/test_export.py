"""Export: checkpoint -> ONNX bundle, parity with PyTorch, fp16 variant, manifest, bundle integrity,
refusals and errors, the BentoML model store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from fmnist_data import needs_fmnist, require_fmnist

from aegan_cli import main
from aegan_core.bundle import (
    DATA_TENSOR,
    DIRECTIONS_NAME,
    FILE_NAMES,
    LATENT_TENSOR,
    MANIFEST_NAME,
    BundleError,
    load_bundle,
)
from export import onnx_export
from export.bundle_writer import export_bundle
from export.onnx_export import ExportError, ParityError
from training.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from training.config import RunConfig, from_preset, validate
from training.networks import build_networks
from training.training_loop import train

REPO = Path(__file__).resolve().parent.parent
BATCHES = (1, 7, 64)


def tiny_config(
    mode: str = "aegan", arch: str = "conv", source: str = "fashion-mnist"
) -> RunConfig:
    cfg = from_preset("tiny")
    cfg.data.source = source
    cfg.data.limit = 64
    cfg.model.arch = arch
    cfg.model.hidden = 16
    cfg.model.depth = 2
    cfg.loss.mode = mode
    cfg.train.steps = 3
    cfg.train.image_every = 0
    cfg.train.checkpoint_every = 0
    cfg.train.progress = False
    return validate(cfg)


def ema_reference(checkpoint: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The EMA networks rebuilt straight from the checkpoint, independently of export/."""
    state = load_checkpoint(checkpoint)
    cfg = RunConfig.from_dict(state["config"])
    nets = build_networks(cfg.model, cfg.loss.mode)
    for key in ("G", "E"):
        nets[key].load_state_dict(state["ema"][key])
        nets[key].eval()
    return nets["G"], nets["E"]


def run_onnx(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {name: x})[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary directories an export may have left beside its output."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    require_fmnist()
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-aegan"
    train(tiny_config(), run_dir)
    report = {  # as written by `aegan eval RUN --json RUN/eval.json`
        "step": 3,
        "metrics": {"recon_mse": 0.5, "fd_fmnist": 99.0},
        "details": {"seconds": {"fd_fmnist": 1.0}},
        "num_samples": 100,
    }
    (run_dir / "eval.json").write_text(json.dumps(report))
    return run_dir


@pytest.fixture(scope="module")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return export_bundle(tiny_run, out, metrics={"fd_fmnist": 42.0, "precision": 0.5})


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


# --- the bundle -----------------------------------------------------------------------------


def test_bundle_holds_the_graphs_and_a_complete_manifest(tiny_run, tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    checkpoint = resolve_checkpoint(tiny_run)
    state = load_checkpoint(checkpoint)
    assert sorted(p.name for p in tiny_bundle.iterdir()) == sorted(
        [MANIFEST_NAME, *FILE_NAMES.values(), DIRECTIONS_NAME]
    )
    # latent directions from the run's training data (tests/test_directions.py tests them)
    assert bundle.directions is not None and bundle.directions.components.shape == (8, 8)
    assert (m["directions"]["samples"], m["directions"]["data"]) == (64, "fashion-mnist:train[:64]")
    assert (bundle.name, bundle.kind, bundle.data_shape, bundle.latent_dim) == (
        "tiny-aegan",
        "image",
        (1, 28, 28),
        8,
    )
    assert m["latent_prior"] == "normal(0, I)"
    assert m["pixel_range"] == [-1.0, 1.0] and m["normalisation"] == "x = pixel / 127.5 - 1"
    assert m["opset"] >= 18
    assert m["training_config"] == state["config"]
    assert (m["step"], m["source_checkpoint"]) == (3, checkpoint.name)
    assert "dynamo" in m["exporter"]
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["onnx"] == onnx.__version__
    for role in ("generator", "encoder"):
        record = m["parity"][role]
        assert record["max_abs_error"]["CPUExecutionProvider"] <= record["tolerance"] <= 1e-4
    for role in ("generator_fp16", "encoder_fp16"):
        record = m["parity"][role]
        measured = set(record["max_abs_error"]) | set(record.get("skipped", {}))
        assert {"CPUExecutionProvider", "CUDAExecutionProvider"} <= measured
        assert all(e <= record["tolerance"] for e in record["max_abs_error"].values())
    # eval.json from the run, overridden where --metrics-json says otherwise
    assert m["metrics"] == {"recon_mse": 0.5, "fd_fmnist": 42.0, "precision": 0.5}
    assert m["evaluation"] == [
        {"from": str(tiny_run / "eval.json"), "step": 3, "num_samples": 100},
        {"from": "given to export"},
    ]
    assert bundle.tensor_names("generator") == (LATENT_TENSOR, DATA_TENSOR)
    assert bundle.tensor_names("encoder") == (DATA_TENSOR, LATENT_TENSOR)


def test_manifest_hashes_match_the_files(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    for entry in manifest["files"].values():
        data = (tiny_bundle / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]


@pytest.mark.parametrize("file_name", sorted(FILE_NAMES.values()))
def test_graphs_pass_the_full_checker_with_a_dynamic_batch(tiny_bundle, file_name):
    model = onnx.load(tiny_bundle / file_name)
    onnx.checker.check_model(model, full_check=True)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] == json.loads((tiny_bundle / MANIFEST_NAME).read_text())["opset"]
    (inp,), (out,) = model.graph.input, model.graph.output
    for value in (inp, out):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp16 keeps fp32 IO
        assert value.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    expected = (
        (LATENT_TENSOR, DATA_TENSOR) if "generator" in file_name else (DATA_TENSOR, LATENT_TENSOR)
    )
    assert (inp.name, out.name) == expected
    if ".fp16." in file_name:
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_runtime_matches_the_pytorch_ema_networks(tiny_run, tiny_bundle, batch):
    generator, encoder = ema_reference(resolve_checkpoint(tiny_run))
    rng = np.random.default_rng(batch)
    z = rng.standard_normal((batch, 8)).astype(np.float32)
    x = rng.uniform(-1, 1, (batch, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        want_x = generator(torch.from_numpy(z)).numpy()
        want_z = encoder(torch.from_numpy(x)).numpy()
    got_x = run_onnx(tiny_bundle / "generator.onnx", LATENT_TENSOR, z)
    got_z = run_onnx(tiny_bundle / "encoder.onnx", DATA_TENSOR, x)
    assert got_x.shape == (batch, 1, 28, 28) and got_z.shape == (batch, 8)
    assert np.abs(got_x - want_x).max() <= 1e-4
    assert np.abs(got_z - want_z).max() <= 1e-4
    manifest = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    if "CPUExecutionProvider" in manifest["parity"]["generator_fp16"]["max_abs_error"]:
        half_x = run_onnx(tiny_bundle / "generator.fp16.onnx", LATENT_TENSOR, z)
        half_z = run_onnx(tiny_bundle / "encoder.fp16.onnx", DATA_TENSOR, x)
        assert half_x.dtype == np.float32 and np.abs(half_x - want_x).max() <= 1e-2
        assert np.abs(half_z - want_z).max() <= 1e-2 * max(1.0, np.abs(want_z).max())


# --- load_bundle refuses a damaged bundle, naming the file -----------------------------------


def test_tampered_file_is_refused(bundle_copy):
    path = bundle_copy / "encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"encoder\.onnx does not match its manifest"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "generator.fp16.onnx").unlink()
    with pytest.raises(BundleError, match=r"generator\.fp16\.onnx is missing"):
        load_bundle(bundle_copy)


def test_truncated_file_is_refused(bundle_copy):
    path = bundle_copy / "generator.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"generator\.onnx does not match.*truncated"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: "{not json", r"manifest\.json is not valid JSON"),
        (lambda m: json.dumps([m]), r"manifest\.json must hold a JSON object"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "opset"}), r"lacks.*opset"),
        (
            lambda m: json.dumps(
                {**m, "files": {**m["files"], "encoder": {"path": "encoder.onnx"}}}
            ),
            r"manifest\.json: entry for 'encoder' is malformed",
        ),
    ],
    ids=["not-json", "not-object", "missing-key", "bad-entry"],
)
def test_malformed_manifest_is_refused(bundle_copy, damage, message):
    path = bundle_copy / MANIFEST_NAME
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


# --- refusals and errors leave nothing behind -----------------------------------------------


@needs_fmnist
def test_gan_run_is_refused_with_a_clear_message(tmp_path):
    run_dir = tmp_path / "gan-run"
    train(tiny_config(mode="gan"), run_dir)
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"mode=gan run has no encoder"):
        export_bundle(run_dir, out)
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(out)])
    assert result.exit_code != 0 and "no encoder" in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def _truncated(tiny_run: Path, folder: Path) -> Path:
    data = resolve_checkpoint(tiny_run).read_bytes()
    path = folder / "step-0000003.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


def _foreign(tiny_run: Path, folder: Path) -> Path:
    path = folder / "notes.pt"
    path.write_text("these are not weights\n")
    return path


def _not_aegan(tiny_run: Path, folder: Path) -> Path:
    path = folder / "weights.pt"
    torch.save({"G": torch.zeros(3)}, path)
    return path


def _empty_run(tiny_run: Path, folder: Path) -> Path:
    (folder / "run" / "checkpoints").mkdir(parents=True)
    return folder / "run"


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda run, folder: folder / "nowhere.pt", "no such checkpoint file or run directory"),
        (_truncated, "not a readable checkpoint"),
        (_foreign, "not a readable checkpoint"),
        (_not_aegan, "not an AEGAN checkpoint"),
        (_empty_run, "holds no loadable checkpoint"),
    ],
    ids=["missing", "truncated", "not-a-checkpoint", "foreign-checkpoint", "empty-run"],
)
def test_bad_sources_fail_with_a_checkpoint_error(tiny_run, tmp_path, make_source, message):
    source = make_source(tiny_run, tmp_path)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(CheckpointError, match=message):
        export_bundle(source, out)
    result = CliRunner().invoke(main, ["export", str(source), "--out", str(out)])
    assert result.exit_code == 1 and message in result.output
    assert not out.exists()
    assert not out.parent.exists() or leftovers(out.parent) == []


def test_parity_failure_fails_loudly_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", 1e-12)
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match=r"generator\.onnx: parity check failed on CPU.*exceeds"):
        export_bundle(tiny_run, out, fp16=False)
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_out_is_refused_without_force(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_bundle(tiny_run, out)
    with pytest.raises(ExportError, match="not a model bundle"):
        export_bundle(tiny_run, out, force=True)  # --force never replaces an arbitrary folder
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_cli_force_replaces_a_bundle_and_saves_it_in_the_bentoml_store(
    tiny_run, tiny_bundle, tmp_path
):
    out = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    refused = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(out)])
    assert refused.exit_code == 1 and "--force" in refused.output

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"fd_fmnist": 7.5}))
    args = ["export", str(tiny_run), "--out", str(out), "--force", "--no-fp16", "--name", "demo"]
    args += ["--metrics-json", str(metrics), "--bentoml-name", "tiny-aegan"]
    # A fresh process: BentoML fixes its home directory the first time it is used.
    script = f"""
import json, sys, bentoml
from aegan_cli import main
from aegan_core.bundle import load_bundle
main({args!r}, standalone_mode=False)
model = bentoml.models.get("tiny-aegan")
bundle = load_bundle(model.path)
print(json.dumps({{"name": bundle.name, "labels": model.info.labels,
                  "metadata": model.info.metadata, "files": sorted(bundle.manifest["files"])}}))
"""
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "BentoML model: tiny-aegan:" in done.stdout
    bundle = load_bundle(out)
    assert bundle.name == "demo" and not bundle.has("generator_fp16")
    assert bundle.metrics["fd_fmnist"] == 7.5
    assert leftovers(tmp_path) == []
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["name"] == "demo" and info["files"] == ["encoder", "generator"]
    assert info["labels"]["kind"] == "image"
    assert info["metadata"]["latent_dim"] == 8 and info["metadata"]["metrics"]["fd_fmnist"] == 7.5


# --- mlp families ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["vectors", pytest.param("fashion-mnist", marks=needs_fmnist)])
def test_mlp_round_trip(tmp_path, data):
    if data == "vectors":
        rng = np.random.default_rng(0)
        source = tmp_path / "points.npy"
        np.save(source, (rng.standard_normal((128, 6)) * 3).astype(np.float32))
        cfg = tiny_config(arch="mlp", source=str(source))
        shape, kind = (6,), "vector"
    else:
        cfg = tiny_config(arch="mlp")
        shape, kind = (1, 28, 28), "image"
    train(cfg, tmp_path / "run")
    checkpoint = resolve_checkpoint(tmp_path / "run")
    source = checkpoint if data == "vectors" else tmp_path / "run"  # a file or a run directory
    out = export_bundle(source, tmp_path / "bundle", fp16=(data == "vectors"))
    bundle = load_bundle(out)
    assert bundle.name == "run"  # a checkpoint inside RUN/checkpoints/ is named after RUN
    assert (bundle.kind, bundle.data_shape, bundle.latent_dim) == (kind, shape, 8)
    assert ("pixel_range" in bundle.manifest) == (kind == "image")
    assert bundle.manifest["arch"] == "mlp"
    generator, encoder = ema_reference(checkpoint)
    for batch in BATCHES:
        z = np.random.default_rng(batch).standard_normal((batch, 8)).astype(np.float32)
        with torch.no_grad():
            want_x = generator(torch.from_numpy(z)).numpy()
            want_z = encoder(torch.from_numpy(want_x)).numpy()
        got_x = run_onnx(bundle.file("generator"), LATENT_TENSOR, z)
        got_z = run_onnx(bundle.file("encoder"), DATA_TENSOR, want_x)
        assert got_x.shape == (batch, *shape)
        assert np.abs(got_x - want_x).max() <= 1e-4 and np.abs(got_z - want_z).max() <= 1e-4


def test_unreadable_metrics_file_is_named(tiny_run, tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text("[1, 2]")
    out = tmp_path / "bundle"
    args = ["export", str(tiny_run), "--out", str(out), "--metrics-json", str(bad)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and f"{bad}: metrics must be a JSON object" in result.output
    assert not out.exists()
