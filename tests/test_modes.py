"""Mixtures of Gaussians with known modes and the mode-coverage metrics: exact values on
constructed sample sets, the suite's layouts, sidecar files, and the way from a run to its
report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.config import DataConfig, from_preset, validate
from training.data import DataError, load_dataset
from training.evaluate import evaluate, load_model, pick_reference
from training.metrics import EvalContext, GenerativeModel, Reference, compute_metrics
from training.metrics.modes import mode_coverage, nearest_modes, reverse_kl
from training.mixtures import (
    HQ_SHARE,
    SUITE,
    TRAIN_SAMPLES,
    Mixture,
    embedded,
    get_mixture,
    grid,
    hq_radius,
    read_sidecar,
    ring,
    save_mixture,
    sidecar_path,
)
from training.training_loop import train

RING = ring()  # 8 modes, radius 1, std 0.01: 3 std = 0.03


def at_modes(mixture: Mixture, counts: list[int]) -> np.ndarray:
    """counts[k] samples exactly at centre k."""
    return np.repeat(mixture.centres, counts, axis=0)


# --- the metrics on constructed sample sets -------------------------------------------------


def test_all_samples_on_one_mode():
    result = mode_coverage(at_modes(RING, [50, 0, 0, 0, 0, 0, 0, 0]), RING)
    assert result.captured == 1
    assert result.high_quality == 1.0
    assert result.reverse_kl == pytest.approx(math.log(8), rel=1e-12)
    assert result.histogram == [50, 0, 0, 0, 0, 0, 0, 0]


def test_evenly_on_every_mode():
    result = mode_coverage(at_modes(RING, [7] * 8), RING)
    assert (result.captured, result.high_quality, result.reverse_kl) == (8, 1.0, 0.0)


def test_mixed_set_by_hand():
    """3 samples at mode 0, 1 at mode 1, 4 at the origin (100 std from every mode)."""
    samples = np.concatenate([at_modes(RING, [3, 1, 0, 0, 0, 0, 0, 0]), np.zeros((4, 2))])
    result = mode_coverage(samples, RING)
    assert result.captured == 2
    assert result.high_quality == 0.5
    # q = (3/4, 1/4, 0, ...), p = 1/8 each: KL = 3/4 ln 6 + 1/4 ln 2
    expected = 0.75 * math.log(6) + 0.25 * math.log(2)
    assert result.reverse_kl == pytest.approx(expected, rel=1e-12)
    assert mode_coverage(samples, RING, min_count=2).captured == 1  # mode 1 has one sample only


def test_high_quality_radius_is_three_std_in_2d():
    centre = RING.centres[2]  # (0, 1): step along x, away from every other mode
    inside = centre + np.array([[0.0299, 0.0], [0.0, -0.0299], [0.0211, 0.0211]])  # |.| < 0.03
    outside = centre + np.array([[0.0301, 0.0], [0.0, 0.0301], [0.0213, 0.0213]])  # |.| > 0.03
    assert mode_coverage(inside, RING).high_quality == 1.0
    assert mode_coverage(outside, RING).high_quality == 0.0
    assert math.isnan(mode_coverage(outside, RING).reverse_kl)  # no high-quality sample
    assert mode_coverage(outside, RING).captured == 0


def test_samples_go_to_the_nearest_centre():
    centres = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    samples = np.array([[0.4, 0.0], [0.6, 0.0], [0.0, 1.4], [0.0, 1.6], [5.0, 5.0]])
    index, dist = nearest_modes(samples, centres)
    assert index.tolist() == [0, 1, 0, 2, 2]
    assert dist == pytest.approx([0.4, 0.4, 1.4, 1.4, math.hypot(5.0, 2.0)])


def test_reverse_kl_uses_the_true_weights():
    weights = np.array([0.5, 0.25, 0.25])
    assert reverse_kl([2, 1, 1], weights) == pytest.approx(0.0, abs=1e-15)
    # all at the mode of weight 1/4: ln 4; all at the mode of weight 1/2: ln 2
    assert reverse_kl([0, 5, 0], weights) == pytest.approx(math.log(4), rel=1e-12)
    assert reverse_kl([5, 0, 0], weights) == pytest.approx(math.log(2), rel=1e-12)
    assert math.isnan(reverse_kl([0, 0, 0], weights))


def test_samples_of_the_wrong_dimension_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        mode_coverage(np.zeros((4, 3)), RING)


# --- the suite ------------------------------------------------------------------------------


def test_hq_radius_holds_the_same_share_in_every_dimension():
    assert hq_radius(2) == pytest.approx(3.0, rel=1e-12)
    assert math.erf(hq_radius(1) / math.sqrt(2)) == pytest.approx(HQ_SHARE, rel=1e-12)
    assert 4.7 < hq_radius(10) < 4.9  # sqrt of the chi-square(10) quantile 0.9889
    assert hq_radius(100) > hq_radius(10)


def test_ring_has_eight_distinct_evenly_spaced_modes():
    c = RING.centres
    assert c.shape == (8, 2)
    assert np.allclose(np.linalg.norm(c, axis=1), 1.0)
    gaps = np.linalg.norm(c - np.roll(c, 1, axis=0), axis=1)
    assert np.allclose(gaps, 2 * math.sin(math.pi / 8))  # no two modes coincide
    assert np.allclose(c[0], [1.0, 0.0]) and np.allclose(c[2], [0.0, 1.0], atol=1e-12)
    assert RING.std == 0.01


def test_grid_is_five_by_five_with_spacing_two():
    g = grid()
    expected = {(2 * i - 4.0, 2 * j - 4.0) for i in range(5) for j in range(5)}
    assert {tuple(p) for p in g.centres.tolist()} == expected
    assert g.std == 0.05 and g.num_modes == 25


def test_embedded_modes_lie_on_a_ten_dimensional_subspace():
    m = embedded()
    assert m.centres.shape == (10, 100) and m.mode_dim == 10
    assert np.allclose(m.basis.T @ m.basis, np.eye(10), atol=1e-12)
    dists = np.linalg.norm(m.centres[:, None] - m.centres[None], axis=-1)
    assert np.allclose(dists[~np.eye(10, dtype=bool)], 2 * math.sqrt(2))
    x, _ = m.sample(500, seed=3)
    off_subspace = x - (x @ m.basis) @ m.basis.T
    assert np.abs(off_subspace).max() < 1e-5  # float32 rounding only
    assert m.hq_radius == pytest.approx(hq_radius(10))


@pytest.mark.parametrize("name", list(SUITE))
def test_real_samples_score_as_the_definitions_predict(name):
    """Data drawn from the mixture itself: every mode captured, the high-quality share is the
    mass within the radius (98.9 %, binomial sd 0.07 % at 20 000 samples), histogram balanced."""
    m = SUITE[name]
    x, modes = m.sample(20_000, seed=7)
    result = mode_coverage(x, m)
    assert result.captured == m.num_modes
    assert result.high_quality == pytest.approx(HQ_SHARE, abs=0.004)
    assert result.reverse_kl < 0.01
    assert np.bincount(modes, minlength=m.num_modes).min() > 0


def test_sampling_is_seeded():
    a, _ = RING.sample(100, seed=1)
    b, _ = RING.sample(100, seed=1)
    c, _ = RING.sample(100, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_unknown_mixture_names_the_known_ones():
    with pytest.raises(KeyError, match="ring8"):
        get_mixture("mixture:ring7")


# --- declaring modes: built-in source and sidecar files -------------------------------------


def test_builtin_source_loads_the_training_draw_with_mode_labels():
    cfg = from_preset("vectors-mlp")
    cfg.data.source = "mixture:grid25"
    data = load_dataset(cfg.data)
    assert data.kind == "vector" and data.shape == (2,) and len(data) == TRAIN_SAMPLES
    assert data.labels is not None and int(data.labels.max()) == 24
    cfg.data.source = "mixture:nope"
    with pytest.raises(DataError, match="mixture:nope: unknown mixture"):
        load_dataset(cfg.data)


def test_sidecar_round_trip_and_errors(tmp_path):
    path = save_mixture(grid(), tmp_path / "grid.npy", n=300, seed=0)
    assert sidecar_path(path) == tmp_path / "grid.modes.json"
    declared = read_sidecar(path)
    assert np.allclose(declared.centres, grid().centres) and declared.std == 0.05
    assert declared.hq_radius == pytest.approx(3.0) and declared.name == "grid25"
    assert read_sidecar(tmp_path / "none.npy") is None
    bad = {"centres": [[0, 0]], "std": -1}
    sidecar_path(tmp_path / "bad.npy").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'std' must be a positive number"):
        read_sidecar(tmp_path / "bad.npy")
    sidecar_path(tmp_path / "w.npy").write_text(
        json.dumps({"centres": [[0, 0], [1, 1]], "std": 1, "weights": [0.9, 0.9]})
    )
    with pytest.raises(ValueError, match="summing to 1"):
        read_sidecar(tmp_path / "w.npy")
    sidecar_path(tmp_path / "z.npy").write_text(
        json.dumps({"centres": [[0, 0], [1, 1]], "std": 1, "weights": [1.0, 0.0]})
    )
    with pytest.raises(ValueError, match="positive numbers"):  # KL against it would be infinite
        read_sidecar(tmp_path / "z.npy")


def test_a_reverse_kl_without_high_quality_samples_is_json_null():
    from training.evaluate import _json_number

    assert _json_number(float("nan")) is None and _json_number(np.float64("inf")) is None
    assert _json_number(np.int64(3)) == 3 and isinstance(_json_number(np.int64(3)), int)
    assert _json_number(np.float32(0.5)) == 0.5


def test_pick_reference_brings_the_declared_modes(tmp_path):
    notes: list[str] = []
    ref = pick_reference((2,), {"data": {"source": "mixture:ring8"}}, None, notes)
    assert ref.modes is SUITE["ring8"]
    train_draw = load_dataset(DataConfig(source="mixture:ring8"))
    assert not np.array_equal(ref.samples, train_draw.samples.numpy())  # a held-out draw
    path = save_mixture(RING, tmp_path / "ring.npy", n=200, seed=0)
    ref = pick_reference((2,), {"data": {"source": str(path)}}, None, notes)
    assert ref.modes is not None and ref.modes.num_modes == 8
    np.save(tmp_path / "plain.npy", np.zeros((10, 2), np.float32))
    assert pick_reference((2,), {}, str(tmp_path / "plain.npy"), notes).modes is None


def test_mode_metric_is_skipped_with_a_note_without_declared_modes():
    model = GenerativeModel(lambda z: z.astype(np.float32), None, 2, (2,))
    ref = Reference("vector", np.zeros((50, 2), np.float32), "plain")
    ctx = EvalContext(model, ref, num_samples=50)
    assert compute_metrics(ctx, ["modes"]) == {}
    assert any("modes skipped: the data declares no modes" in n for n in ctx.notes)


def test_evaluate_reports_modes_of_a_collapsed_generator():
    """A generator that puts every sample on centre 3 of the ring: 1 mode, KL ln 8."""
    centre = RING.centres[3].astype(np.float32)
    model = GenerativeModel(lambda z: np.tile(centre, (len(z), 1)), None, 2, (2,))
    ref = pick_reference((2,), {"data": {"source": "mixture:ring8"}}, None, [])
    report = evaluate(model, ref, None, num_samples=400)
    m = report["metrics"]
    assert m["modes_captured"] == 1 and m["modes_high_quality"] == 1.0
    assert m["modes_reverse_kl"] == pytest.approx(math.log(8), rel=1e-6)
    assert m["energy_distance"] > 0
    assert report["details"]["modes"]["histogram"] == [0, 0, 0, 400, 0, 0, 0, 0]


def test_reconstructions_cover_the_modes_where_the_prior_falls_on_one():
    """E puts codes at radius 3; G snaps a code beyond radius 2 to its nearest mode and anything
    else to mode 3. Prior samples mostly land inside (collapse), reconstructions never do."""

    def generate(z: np.ndarray) -> np.ndarray:
        nearest = nearest_modes(z / 3.0, RING.centres)[0]
        inside = np.linalg.norm(z, axis=1) <= 2.0
        return RING.centres[np.where(inside, 3, nearest)].astype(np.float32)

    model = GenerativeModel(generate, lambda x: 3.0 * x, 2, (2,))
    ref = pick_reference((2,), {"data": {"source": "mixture:ring8"}}, None, [])
    report = evaluate(model, ref, ["modes", "recon_modes"], num_samples=400)
    m = report["metrics"]
    # 2-D N(0, I) holds 1 - exp(-2) = 86 % of its mass within radius 2: mode 3 takes most samples.
    assert report["details"]["modes"]["histogram"][3] > 300 and m["modes_reverse_kl"] > 1.0
    expected = np.bincount(nearest_modes(ref.subset(400), RING.centres)[0], minlength=8)
    assert report["details"]["recon_modes"]["histogram"] == expected.tolist()
    assert m["recon_modes_captured"] == 8 and m["recon_modes_high_quality"] == 1.0
    assert m["recon_modes_reverse_kl"] == pytest.approx(reverse_kl(expected, RING.weights))
    gan = GenerativeModel(generate, None, 2, (2,))
    skipped = evaluate(gan, ref, ["recon_modes"], num_samples=50)
    assert skipped["metrics"] == {}


def test_a_run_on_a_mixture_is_evaluated_on_its_modes(tmp_path):
    cfg = from_preset("vectors-mlp")
    cfg.data.source = "mixture:ring8"
    cfg.train.steps, cfg.train.batch_size, cfg.train.progress = 4, 32, False
    cfg.train.log_every, cfg.train.checkpoint_every = 2, 0
    train(validate(cfg), tmp_path / "run")
    model, info = load_model(tmp_path / "run")
    notes: list[str] = []
    reference = pick_reference(model.data_shape, info.pop("config"), None, notes)
    report = evaluate(model, reference, None, num_samples=300, notes=notes)
    keys = {"modes_captured", "modes_high_quality", "modes_reverse_kl", "energy_distance"}
    assert keys <= set(report["metrics"])
    assert 0 <= report["metrics"]["modes_captured"] <= 8
    assert report["details"]["modes"]["total"] == 8
