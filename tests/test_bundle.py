"""The bundle format (aegan_core/bundle.py): every graph's hash checked, fp16 ones included; paths
kept inside the bundle; each refusal names the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from bundle_factory import tamper

from aegan_core.bundle import (
    FILE_NAMES,
    MANIFEST_NAME,
    BundleError,
    file_entry,
    load_bundle,
    sha256_file,
    write_manifest,
)


@pytest.fixture
def fp16_bundle(rgb_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the colour bundle, which carries all four graphs."""
    return Path(shutil.copytree(rgb_bundle, tmp_path / "bundle"))


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_an_intact_bundle_loads_with_all_four_graphs(fp16_bundle):
    bundle = load_bundle(fp16_bundle)
    assert {role: bundle.file(role).name for role in FILE_NAMES} == FILE_NAMES
    assert (bundle.kind, bundle.data_shape, bundle.latent_dim) == ("image", (3, 16, 24), 8)
    assert bundle.tensor_names("encoder") == ("x", "z")


@pytest.mark.parametrize("role", sorted(FILE_NAMES))
def test_every_graph_hash_is_verified(fp16_bundle, role):
    expected = json.loads((fp16_bundle / MANIFEST_NAME).read_text())["files"][role]["sha256"]
    tamper(fp16_bundle, role)
    actual = sha256_file(fp16_bundle / FILE_NAMES[role])
    name = FILE_NAMES[role].replace(".", r"\.")
    message = (
        rf"{name} does not match its manifest \(sha256 {actual[:12]}\.\.\., expected "
        rf"{expected[:12]}\.\.\.\): the bundle was altered or truncated$"
    )
    with pytest.raises(BundleError, match=message):
        load_bundle(fp16_bundle)
    assert load_bundle(fp16_bundle, verify=False).has(role)  # only the hash was wrong


@pytest.mark.parametrize(
    "where", ["../outside.onnx", "sub/../../outside.onnx", "ABSOLUTE", "sub/encoder.onnx"]
)
def test_a_graph_path_outside_the_bundle_directory_is_refused(fp16_bundle, where):
    """The file exists there with the right hash: only the path itself can be refused."""
    outside = fp16_bundle.parent / "outside.onnx"
    shutil.copy(fp16_bundle / "encoder.onnx", outside)
    (fp16_bundle / "sub").mkdir()
    shutil.copy(fp16_bundle / "encoder.onnx", fp16_bundle / "sub" / "encoder.onnx")
    path = str(outside) if where == "ABSOLUTE" else where

    def point_encoder_there(manifest: dict) -> None:
        manifest["files"]["encoder"]["path"] = path
        manifest["files"]["encoder"]["sha256"] = sha256_file(fp16_bundle / "encoder.onnx")

    _edit_manifest(fp16_bundle, point_encoder_there)
    with pytest.raises(BundleError, match=r"is outside the bundle"):
        load_bundle(fp16_bundle)
    with pytest.raises(BundleError, match=r"is outside the bundle"):
        load_bundle(fp16_bundle, verify=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=2), "has format_version 2; this server reads version 1"),
        (lambda m: m.update(kind="audio"), "kind must be 'image' or 'vector'"),
        (lambda m: m.update(files=[]), "'files' must be an object"),
        (lambda m: m["files"].pop("generator"), "names no 'generator' graph"),
        (lambda m: m["files"].pop("encoder"), "names no 'encoder' graph"),
        (lambda m: m.pop("latent_dim"), "lacks required keys: latent_dim"),
    ],
)
def test_manifest_problems_are_named(fp16_bundle, edit, message):
    _edit_manifest(fp16_bundle, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(fp16_bundle)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"{not json", "is not valid JSON: Expecting property name enclosed in double quotes"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'"\xff"', "is not valid JSON: 'utf-8' codec can't decode byte 0xff"),
    ],
    ids=["not-json", "not-object", "not-utf-8"],
)
def test_a_manifest_that_is_not_a_json_object_is_named(tmp_path, text, message):
    (tmp_path / MANIFEST_NAME).write_bytes(text)
    with pytest.raises(BundleError) as refused:
        load_bundle(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / MANIFEST_NAME} {message}")


def test_missing_directory_and_manifest_are_named(tmp_path):
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(tmp_path)


def test_optional_graphs_are_optional(fp16_bundle):
    for role in ("generator_fp16", "encoder_fp16"):
        _edit_manifest(fp16_bundle, lambda m, r=role: m["files"].pop(r))
    bundle = load_bundle(fp16_bundle)
    assert not bundle.has("generator_fp16") and bundle.has("generator")
    with pytest.raises(BundleError, match="has no 'encoder_fp16' graph"):
        bundle.file("encoder_fp16")


def test_file_entry_records_name_hash_size_and_tensors(tmp_path):
    data = bytes(range(256)) * 9000  # over 2 MiB: hashed in several blocks
    (tmp_path / "encoder.onnx").write_bytes(data)
    assert file_entry(tmp_path, "encoder", "x", "z") == {
        "path": "encoder.onnx",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "input": "x",
        "output": "z",
    }


def test_write_manifest_checks_the_model_and_writes_sorted_json(tmp_path, fp16_bundle):
    whole = json.loads((fp16_bundle / MANIFEST_NAME).read_text())
    partial = {k: v for k, v in whole.items() if k not in ("kind", "opset")}
    with pytest.raises(BundleError, match="manifest lacks required keys: kind, opset$"):
        write_manifest(tmp_path, partial)
    with pytest.raises(BundleError, match="manifest latent_dim: Input should be greater than"):
        write_manifest(tmp_path, {**whole, "latent_dim": 0})
    assert not (tmp_path / MANIFEST_NAME).exists()
    manifest = dict(reversed(list(whole.items())))
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST_NAME
    text = path.read_text()
    assert json.loads(text) == whole
    assert text.startswith('{\n  "data_shape": [\n') and text.endswith("}\n")


def test_bundle_properties_read_the_manifest(fp16_bundle):
    bundle = load_bundle(fp16_bundle)
    assert bundle.name == "tiny-test" and bundle.path == fp16_bundle
    assert bundle.metrics == {"recon_mse": 0.01}
    bundle.metrics["recon_mse"] = 1.0  # a copy: the manifest is not changed through it
    assert bundle.manifest["metrics"] == {"recon_mse": 0.01}
    assert bundle.tensor_names("generator") == ("z", "x")
    _edit_manifest(fp16_bundle, lambda m: m.pop("metrics"))
    assert load_bundle(fp16_bundle).metrics == {}


def test_an_entry_needs_exactly_path_hash_and_tensor_names(fp16_bundle):
    _edit_manifest(fp16_bundle, lambda m: m["files"]["encoder"].pop("bytes"))
    assert load_bundle(fp16_bundle).has("encoder")  # "bytes" is informative only
