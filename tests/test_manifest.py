"""The Manifest model (aegan_core/manifest.py): the shipped bundle's manifest read and written back
unchanged, unknown keys kept, and every bound the model declares enforced with the field named."""

from __future__ import annotations

import copy
import json

import annotated_types
import pytest

from aegan_core.bundle import DEFAULT_MODEL_DIR, MANIFEST_NAME, load_bundle
from aegan_core.manifest import (
    FORMAT_VERSION,
    DirectionsEntry,
    GraphEntry,
    Manifest,
    ManifestError,
    parse_manifest,
)

SHIPPED = json.loads((DEFAULT_MODEL_DIR / MANIFEST_NAME).read_text())


def test_the_shipped_manifest_round_trips_unchanged():
    spec = parse_manifest(copy.deepcopy(SHIPPED))
    assert spec.to_json() == SHIPPED  # unknown keys (directions.split_half_cosine) kept
    bundle = load_bundle(DEFAULT_MODEL_DIR)
    assert bundle.manifest == SHIPPED
    assert (bundle.kind, bundle.data_shape, bundle.latent_dim) == ("image", (1, 28, 28), 32)
    assert bundle.sha256("encoder") == SHIPPED["files"]["encoder"]["sha256"]


def test_unknown_keys_and_explicit_nulls_are_kept():
    raw = {**copy.deepcopy(SHIPPED), "future_field": {"a": 1}, "step": None}
    assert parse_manifest(raw).to_json() == raw


def test_a_manifest_that_is_not_an_object_is_refused():
    with pytest.raises(ManifestError, match="^must hold a JSON object$"):
        parse_manifest(["generator.onnx", "encoder.onnx"])


def test_a_newer_format_version_is_refused_naming_both():
    with pytest.raises(ManifestError, match=f"format_version 2; this server reads version {1}"):
        parse_manifest({**SHIPPED, "format_version": FORMAT_VERSION + 1})


def _violations(model, base: dict) -> list[tuple[str, object]]:
    """(field, a value that breaks one of its declared bounds) for every bound of ``model``."""
    found = []
    for name, field in model.model_fields.items():
        for bound in field.metadata:
            if isinstance(bound, annotated_types.Ge):
                found.append((name, bound.ge - 1))
            elif isinstance(bound, annotated_types.MinLen):
                found.append((name, "" if isinstance(base.get(name), str) else []))
            elif hasattr(bound, "pattern") and bound.pattern:
                found.append((name, "not-a-hash"))
    return found


@pytest.mark.parametrize(
    ("model", "where"),
    [(Manifest, ()), (GraphEntry, ("files", "encoder")), (DirectionsEntry, ("directions",))],
    ids=["manifest", "graph entry", "directions entry"],
)
def test_every_declared_bound_is_enforced(model, where):
    entry = SHIPPED
    for key in where:
        entry = entry[key]
    cases = _violations(model, entry)
    assert cases, "the walk found no bound: it would test nothing"
    for name, value in cases:
        raw = copy.deepcopy(SHIPPED)
        target = raw
        for key in where:
            target = target[key]
        target[name] = value
        with pytest.raises(ManifestError, match=name):
            parse_manifest(raw)


def test_the_walk_covers_the_bounds_it_should():
    """The bounds the walk above finds, by name: a new bound is found without listing it."""
    assert {n for n, _ in _violations(Manifest, SHIPPED)} >= {"name", "latent_dim", "opset"}
    assert {n for n, _ in _violations(GraphEntry, SHIPPED["files"]["encoder"])} >= {"sha256"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(data_shape=[1, 0, 28]), "data_shape: every dimension must be at least"),
        (lambda m: m.update(latent_dim="many"), "latent_dim: Input should be a valid integer"),
        (
            lambda m: m.update(data_shape=[1, "x", 28]),
            "^data_shape\\.1: Input should be a valid int",
        ),
        (lambda m: m["files"]["encoder"].pop("output"), "entry for 'encoder' is malformed"),
        (
            lambda m: m["directions"].pop("sha256"),
            "^entry 'directions' is malformed \\(sha256: Field required\\)$",
        ),
        (lambda m: m.update(kind="audio"), "^kind must be 'image' or 'vector'$"),
        (lambda m: m.update(files="generator.onnx"), "^'files' must be an object$"),
        (
            lambda m: m["files"].update(encoder="encoder.onnx"),
            r"^entry for 'encoder' is malformed \(Input should be a valid dictionary",
        ),
        # several problems, each said once with the fields it concerns
        (
            lambda m: m.update(kind="audio", files="x"),
            "^kind must be 'image' or 'vector'; 'files' must be an object$",
        ),
        (
            lambda m: m.update(latent_dim=0, opset=0),
            "^latent_dim, opset: Input should be greater than or equal to 1$",
        ),
    ],
)
def test_malformed_fields_are_named(edit, message):
    raw = copy.deepcopy(SHIPPED)
    edit(raw)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(raw)


def test_a_field_added_to_the_model_is_written_and_read(tmp_path):
    """Adding a bundle field is one line in the model: a subclass stands in for that line."""

    class Extended(Manifest):
        calibration: float | None = None

    spec = Extended.model_validate({**SHIPPED, "calibration": 0.5})
    assert spec.to_json()["calibration"] == 0.5
    assert Extended.model_validate(SHIPPED).calibration is None  # older bundles still load
