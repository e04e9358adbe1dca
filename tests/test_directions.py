"""Latent directions: the PCA, the bundle addition (written, hash-checked, optional), the
``aegan directions`` command, and /info serving them. That ``aegan export`` writes them:
tests/test_export.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aegan_cli import main
from aegan_core.bundle import (
    DIRECTIONS_NAME,
    BundleError,
    LatentDirections,
    load_bundle,
    sha256_file,
    write_directions,
    write_manifest,
)
from export.directions import add_directions, pca, split_half_cosine


def random_images(n: int, shape: tuple[int, ...] = (1, 28, 28), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(np.float32)


@pytest.fixture
def bundle_copy(image_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(image_bundle, tmp_path / "bundle"))


@pytest.fixture
def with_directions(bundle_copy: Path) -> Path:
    add_directions(bundle_copy, random_images(300), "random:300")
    return bundle_copy


def manifest_of(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


# --- PCA ------------------------------------------------------------------------------------


def test_pca_recovers_the_axes_and_variances_of_known_data():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    scales = np.array([3.0, 2.0, 1.0, 0.5, 0.1])
    latents = (rng.standard_normal((20_000, 5)) * scales) @ rotation.T + 7.0
    mean, components, variances, total = pca(latents)
    assert np.allclose(mean, 7.0, atol=0.05)
    assert np.allclose(variances, scales**2, rtol=0.05)
    assert total == pytest.approx(float((scales**2).sum()), rel=0.05)
    assert np.allclose(components @ components.T, np.eye(5), atol=1e-9)
    cosines = np.abs((components * rotation.T).sum(axis=1))  # rotation's columns are the axes
    assert (cosines > 0.99).all()
    # the sign is fixed by the data, not by the solver: largest coordinate positive
    assert (components[np.arange(5), np.abs(components).argmax(axis=1)] > 0).all()
    assert min(split_half_cosine(latents, 3)) > 0.99


def test_pca_keeps_at_most_count_components_and_refuses_too_few_latents():
    latents = np.random.default_rng(1).standard_normal((50, 6))
    _, components, variances, _ = pca(latents, count=4)
    assert components.shape == (4, 6) and variances.shape == (4,)
    assert (np.diff(variances) <= 0).all()
    with pytest.raises(ValueError, match="at least 2"):
        pca(latents[:1])


# --- the bundle addition --------------------------------------------------------------------


def test_a_bundle_without_directions_still_loads(image_bundle):
    bundle = load_bundle(image_bundle)
    assert "directions" not in bundle.manifest and bundle.directions is None


def test_added_directions_are_recorded_hashed_and_read_back(bundle_copy):
    before = manifest_of(bundle_copy)
    bundle = add_directions(bundle_copy, random_images(300), "random:300")
    after = manifest_of(bundle_copy)
    entry = after.pop("directions")
    assert after == before  # everything else in the manifest is kept as it was
    assert entry["path"] == DIRECTIONS_NAME and entry["format_version"] == 1
    assert entry["sha256"] == sha256_file(bundle_copy / DIRECTIONS_NAME)
    assert (entry["method"], entry["count"], entry["samples"]) == ("pca", 32, 300)
    assert entry["data"] == "random:300" and len(entry["split_half_cosine"]) == 8
    d = bundle.directions
    assert d is not None and d.components.shape == (32, 32) and d.mean.shape == (32,)
    assert (np.diff(d.variances) <= 1e-6).all() and d.total_variance == pytest.approx(
        d.variances.sum(), rel=1e-5
    )


def test_the_directions_file_and_its_manifest_entry(tmp_path):
    """The file: compact JSON with its own format version, values to seven significant digits
    (also what /info serves); the entry: what the manifest records of it."""
    directions = LatentDirections(
        method="pca",
        mean=np.array([0.5, -1 / 3]),
        components=np.array([[0.6, 0.8]]),
        variances=np.array([2 / 3]),
        total_variance=1.0,
        samples=10,
        data="toy",
    )
    entry = write_directions(tmp_path, directions)
    text = (tmp_path / DIRECTIONS_NAME).read_bytes()
    assert text == (
        b'{"format_version":1,"method":"pca","samples":10,"data":"toy","total_variance":1.0,'
        b'"variances":[0.6666667],"mean":[0.5,-0.3333333],"components":[[0.6,0.8]]}\n'
    )
    assert entry == {
        "format_version": 1,
        "path": DIRECTIONS_NAME,
        "sha256": sha256_file(tmp_path / DIRECTIONS_NAME),
        "bytes": len(text),
        "method": "pca",
        "count": 1,
        "samples": 10,
        "data": "toy",
    }


def test_directions_of_the_wrong_data_shape_are_refused(bundle_copy):
    with pytest.raises(BundleError, match=r"shape \[3, 28, 28\]"):
        add_directions(bundle_copy, random_images(10, (3, 28, 28)), "colour")


def test_tampered_directions_are_refused(with_directions):
    path = with_directions / DIRECTIONS_NAME
    path.write_text(path.read_text().replace('"mean":[', '"mean":[1e-3,', 1))
    with pytest.raises(BundleError, match="directions.json does not match its manifest"):
        load_bundle(with_directions)


def test_missing_directions_file_is_refused(with_directions):
    (with_directions / DIRECTIONS_NAME).unlink()
    with pytest.raises(BundleError, match="incomplete: directions.json is missing"):
        load_bundle(with_directions)


def rewrite(bundle_dir: Path, change_file=None, change_entry=None) -> None:
    """Change the directions file or its entry, and record the file's new hash (so that only the
    content checks can catch the change)."""
    path = bundle_dir / DIRECTIONS_NAME
    if change_file is not None:
        raw = json.loads(path.read_text())
        change_file(raw)
        path.write_text(json.dumps(raw))
    manifest = manifest_of(bundle_dir)
    manifest["directions"]["sha256"] = sha256_file(path)
    if change_entry is not None:
        change_entry(manifest["directions"])
    write_manifest(bundle_dir, manifest)


@pytest.mark.parametrize(
    "change_file, change_entry, message",
    [
        (
            None,
            lambda e: e.update(format_version=2),
            "manifest.json: entry 'directions' has format_version 2; this server reads",
        ),
        (
            None,
            lambda e: e.update(path="../x.json"),
            "manifest.json: entry 'directions'.* outside the bundle",
        ),
        # a component more than there are variances
        (lambda r: r["components"].append(r["components"][0]), None, "and k >= 1 components"),
        (lambda r: r["components"][0].__setitem__(0, 5.0), None, "not orthonormal"),
        (lambda r: r["mean"].pop(), None, "expected a mean of 32 numbers"),
        (lambda r: r["variances"].__setitem__(0, -1.0), None, "variances >= 0"),
        (lambda r: r.pop("components"), None, "not a valid directions file"),
    ],
)
def test_inconsistent_directions_are_refused(with_directions, change_file, change_entry, message):
    rewrite(with_directions, change_file, change_entry)
    with pytest.raises(BundleError, match=message):
        load_bundle(with_directions)


def test_a_single_direction_is_enough(with_directions):
    def keep_one(raw: dict) -> None:
        del raw["components"][1:], raw["variances"][1:]

    rewrite(with_directions, keep_one)
    directions = load_bundle(with_directions).directions
    assert directions is not None and directions.components.shape == (1, 32)


def test_a_direction_of_no_variance_is_taken(with_directions):
    rewrite(with_directions, lambda r: r["variances"].__setitem__(-1, 0.0))
    directions = load_bundle(with_directions).directions
    assert directions is not None and directions.variances[-1] == 0.0


# --- commands -------------------------------------------------------------------------------


def test_directions_command_adds_them_to_an_existing_bundle(bundle_copy, tmp_path):
    data = tmp_path / "images.npy"
    np.save(data, (random_images(200, seed=3) + 1) / 2)  # .npy images hold [0, 1]
    result = CliRunner().invoke(main, ["directions", str(bundle_copy), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "32 directions from 200 latents" in result.output
    assert "split-half |cos|" in result.output
    assert load_bundle(bundle_copy).directions is not None


def test_directions_command_names_a_bad_bundle(tmp_path):
    result = CliRunner().invoke(main, ["directions", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "is not a directory" in result.output


def test_the_shipped_bundle_has_directions():
    bundle = load_bundle(Path(__file__).resolve().parents[1] / "models" / "fashion-mnist")
    assert bundle.directions is not None
    assert bundle.manifest["directions"]["data"] == "fashion-mnist:train"
    assert bundle.directions.samples == 60_000
    assert bundle.metrics["fd_fmnist"] > 0  # the rest of its manifest is still there


# --- served -----------------------------------------------------------------------------------


def test_info_lists_the_directions_or_null(image_bundle, with_directions):
    from service_helpers import serve

    with serve(image_bundle) as client:
        assert client.post("/info").json()["model"]["directions"] is None
    with serve(with_directions) as client:
        d = client.post("/info").json()["model"]["directions"]
        assert d["method"] == "pca" and d["samples"] == 300 and d["data"] == "random:300"
        assert np.array(d["components"]).shape == (32, 32) and len(d["variances"]) == 32
