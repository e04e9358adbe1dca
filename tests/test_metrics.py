"""Metrics: known cases of each formula, the registry, the classifier, ``aegan eval`` and the
training-time evaluation hook."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fmnist_data import FMNIST, needs_fmnist

from aegan_cli import main
from aegan_core.images import psnr, to_unit
from training.config import ConfigError, RunConfig, from_preset, validate
from training.metrics import (
    METRICS,
    EvalContext,
    GenerativeModel,
    Reference,
    UnknownMetricError,
    check_metric_names,
    compute_metrics,
    register_metric,
)
from training.metrics.classifier import WEIGHTS, classifier_info, load_classifier, report
from training.metrics.coverage import class_histogram, classes_covered, kl_to_uniform
from training.metrics.gaussian import frechet_distance, mean_cov
from training.metrics.precision_recall import knn_radii, precision_recall
from training.metrics.registry import Metric
from training.metrics.vectors import energy_distance

# --- Fréchet distance -----------------------------------------------------------------------


def test_fd_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).standard_normal((2000, 16)) @ np.diag(np.arange(1, 17))
    mu, cov = mean_cov(feats.astype(np.float32))
    assert mu.dtype == cov.dtype == np.float64  # float32 features are summed in float64
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((8, 8))
    cov = a @ a.T + 0.1 * np.eye(8)  # a full, non-diagonal covariance
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(expected, rel=1e-9)


def test_fd_of_diagonal_gaussians_matches_closed_form():
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu = np.zeros(3)
    expected = float(np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))  # 1 + 1 + 0
    assert frechet_distance(mu, np.diag(var1), mu, np.diag(var2)) == pytest.approx(expected)


def test_fd_from_samples_approaches_the_shift():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20000, 4))
    y = rng.standard_normal((20000, 4)) + np.array([1.0, 0.0, 0.0, 0.0])
    assert frechet_distance(*mean_cov(x), *mean_cov(y)) == pytest.approx(1.0, abs=0.05)


# --- precision and recall -------------------------------------------------------------------


def test_precision_recall_identical_sets_are_one():
    feats = np.random.default_rng(3).standard_normal((300, 8))
    assert precision_recall(feats, feats.copy()) == (1.0, 1.0)


def test_precision_recall_disjoint_clusters_are_zero():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((300, 8))
    fake = rng.standard_normal((300, 8)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_recall_is_half_when_samples_cover_one_of_two_modes():
    rng = np.random.default_rng(5)
    centres = np.zeros((2, 8))
    centres[1, 0] = 50.0
    real = rng.standard_normal((1000, 8)) + centres[np.arange(1000) % 2]
    fake = real[::2] + 1e-6 * rng.standard_normal((500, 8))  # mode collapse onto the first mode
    assert precision_recall(real, fake) == (1.0, 0.5)


def test_precision_recall_of_two_draws_of_one_distribution_are_high():
    rng = np.random.default_rng(6)
    precision, recall = precision_recall(
        rng.standard_normal((1000, 4)), rng.standard_normal((1000, 4))
    )
    assert precision > 0.8 and recall > 0.8


def _on_a_line(*xs: float) -> np.ndarray:
    """Points (x, 0): distances are differences of x, exact in float64."""
    return np.array([[x, 0.0] for x in xs])


def test_knn_radius_reaches_the_kth_nearest_other_point():
    # 0..9 on a line, k = 3: the ends reach 3 (neighbours 1, 2, 3 away), inner points 2 (1, 1, 2).
    radii = knn_radii(torch.as_tensor(_on_a_line(*range(10))), k=3)
    assert radii.tolist() == [9.0] + [4.0] * 8 + [9.0]  # squared distances
    assert knn_radii(torch.as_tensor(_on_a_line(*range(10))), k=1).tolist() == [1.0] * 10


def test_precision_and_recall_of_points_on_a_line():
    """Real points 0..9; the real manifold is [-3, 12] at the ends (radius 3) and +-2 inside.
    Of the six other points, 11.5, 12 (on the boundary: balls are closed), -2.5 and 4.5 are
    inside, 12.5 and -3.5 are not."""
    line = _on_a_line(*range(10))
    others = _on_a_line(11.5, 12.0, 12.5, -2.5, -3.5, 4.5)
    # Seen as samples, 4 of 6 are on the data manifold; the others' manifold (radii >= 7) holds
    # every real point.
    assert precision_recall(line, others) == (4 / 6, 1.0)
    # Seen as the data, 4 of 6 are covered by the line's manifold.
    assert precision_recall(others, line) == (1.0, 4 / 6)


def test_precision_recall_over_several_chunks():
    """1500 points (two chunks of 1000): radii 3 at the ends, 2 inside; of 1500 samples, the 1000
    half-way between real points are inside and the 500 far away are not."""
    line = _on_a_line(*range(1500))
    assert knn_radii(torch.as_tensor(line)).tolist() == [9.0] + [4.0] * 1498 + [9.0]
    samples = _on_a_line(*(np.arange(1000) + 0.5), *(np.arange(500) + 10_000.0))
    precision, recall = precision_recall(line, samples)
    assert precision == 1000 / 1500
    assert recall == 1003 / 1500  # samples 0.5..999.5 cover reals 0..1002 (radius 3 at 999.5)


def test_precision_recall_need_more_than_k_samples():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# --- coverage, reconstruction, vectors ------------------------------------------------------


def test_coverage_of_uniform_and_single_class():
    uniform = class_histogram(np.arange(1000) % 10)
    assert kl_to_uniform(uniform) == pytest.approx(0.0, abs=1e-12)
    assert classes_covered(uniform) == 10
    collapsed = class_histogram(np.full(500, 3))
    assert kl_to_uniform(collapsed) == pytest.approx(math.log(10))
    assert classes_covered(collapsed) == 1
    half = class_histogram(np.array([0] * 96 + [1] * 4))  # 4 % is under the 5 % bar
    assert classes_covered(half) == 1


def test_pixels_to_unit_range_clip_first():
    np.testing.assert_array_equal(to_unit(np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0])),
                                  [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])  # fmt: skip


def test_psnr_of_known_noise():
    rng = np.random.default_rng(6)
    clean = np.full((50, 1, 28, 28), 0.5)
    sigma = 0.1
    noisy = clean + sigma * rng.choice([-1.0, 1.0], size=clean.shape)  # MSE exactly sigma^2
    assert psnr(clean, noisy) == pytest.approx(np.full(50, 20.0), abs=1e-9)  # -20 log10(0.1)
    assert psnr(clean, clean).max() == 100.0  # capped, not infinite


def test_reconstruction_errors_are_measured_on_pixels_in_0_1():
    """A decoder that adds 0.2 to every pixel in [-1, 1] is 0.1 off on [0, 1]: MSE 0.01 and PSNR
    20 dB (on [-1, 1] it would be 0.04 and 14 dB). Latents keep their own units: 0.2^2."""
    rng = np.random.default_rng(7)
    images = rng.uniform(-0.5, 0.5, (64, 1, 28, 28)).astype(np.float32)
    model = GenerativeModel(
        generate=lambda z: z.reshape(len(z), 1, 28, 28) + np.float32(0.2),
        encode=lambda x: x.reshape(len(x), -1),  # so E(G(z)) = z + 0.2
        latent_dim=784,
        data_shape=(1, 28, 28),
    )
    ctx = EvalContext(model, Reference("fmnist", images, "synthetic"), 64)
    results = METRICS["reconstruction"].fn(ctx)
    # float32 sums with 0.2 are off by ~1e-8 per pixel; 1e-5 relative is far below the 4x (6 dB)
    # of a [-1, 1] scale
    assert results["recon_mse"] == pytest.approx(0.01, rel=1e-5)
    assert results["recon_psnr"] == pytest.approx(20.0, abs=1e-4)
    assert results["latent_mse"] == pytest.approx(0.04, rel=1e-5)


def _flat_autoencoder(decode_all_to: np.ndarray | None = None) -> GenerativeModel:
    """z is the flattened image: E and G are reshapes (exact reconstructions), or G sends every
    latent to one fixed image."""

    def generate(z: np.ndarray) -> np.ndarray:
        if decode_all_to is not None:
            return np.repeat(decode_all_to[None], len(z), axis=0)
        return z.reshape(len(z), 1, 28, 28)

    return GenerativeModel(generate, lambda x: x.reshape(len(x), -1), 784, (1, 28, 28))


@needs_fmnist
def test_reconstruction_class_agreement_on_exact_and_constant_decoders():
    from training.evaluate import fmnist_reference

    ref = fmnist_reference(str(FMNIST))
    exact = compute_metrics(EvalContext(_flat_autoencoder(), ref, 500), ["reconstruction"])
    assert exact["recon_class_agreement"] == 1.0
    assert exact["recon_psnr"] == 100.0 and exact["latent_mse"] == 0.0
    assert exact["recon_class_kl"] < 0.05  # the test split's subset is near balanced

    image = ref.samples[0]
    ctx = EvalContext(_flat_autoencoder(decode_all_to=image), ref, 500)
    constant = compute_metrics(ctx, ["reconstruction"])
    labels = ref.features_and_logits[1].argmax(1)
    share = float(np.mean(labels[ref.subset_indices(500)] == labels[0]))
    assert constant["recon_class_agreement"] == pytest.approx(share)
    assert 0 < share < 0.5
    assert constant["recon_class_kl"] == pytest.approx(math.log(10))
    assert sum(ctx.details["recon_class_shares"].values()) == pytest.approx(1.0)


def test_energy_distance_zero_for_identical_and_grows_with_shift():
    x = np.random.default_rng(7).standard_normal((400, 3))
    assert energy_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-12)
    near = energy_distance(x, x + 0.5)
    far = energy_distance(x, x + 2.0)
    assert 0 < near < far


def test_energy_distance_of_small_sets_by_hand():
    # x = {0, 1}, y = {3}: E|x - y| = (3 + 2) / 2, E|x - x'| = (0 + 1 + 1 + 0) / 4, E|y - y'| = 0
    assert energy_distance(np.array([[0.0], [1.0]]), np.array([[3.0]])) == pytest.approx(4.5)
    # more rows than one chunk (1000): every pair still counted once
    x, y = np.zeros((2500, 1)), np.ones((1200, 1))
    assert energy_distance(x, y) == pytest.approx(2.0, rel=1e-12)  # 2 * 1 - 0 - 0
    y[:600] = 3.0  # E|x - y| = 2, E|y - y'| = 2 * 0.5 * 0.5 * 2 = 1
    assert energy_distance(x, y) == pytest.approx(3.0, rel=1e-12)


def test_energy_distance_matches_one_dimensional_closed_form():
    # N(0, 1) vs N(m, 1): 2 E|X-Y| - E|X-X'| - E|Y-Y'| with X-Y ~ N(-m, 2), X-X' ~ N(0, 2).
    m, rng = 1.0, np.random.default_rng(8)
    x, y = rng.standard_normal((3000, 1)), rng.standard_normal((3000, 1)) + m
    s = math.sqrt(2.0)
    folded = s * math.sqrt(2 / math.pi) * math.exp(-(m**2) / 4) + m * math.erf(
        m / (s * math.sqrt(2))
    )
    expected = 2 * folded - 2 * (2 / math.sqrt(math.pi))
    assert energy_distance(x, y) == pytest.approx(expected, abs=0.03)


# --- registry -------------------------------------------------------------------------------


def test_registry_knows_the_metric_families():
    expected = {
        "fd_fmnist",
        "precision",
        "recall",
        "coverage",
        "reconstruction",
        "energy_distance",
        "modes",
    }
    assert expected <= set(METRICS)


def test_registry_rejects_unknown_names():
    assert check_metric_names(["fd_fmnist", " recall", "fd_fmnist"]) == ["fd_fmnist", "recall"]
    with pytest.raises(UnknownMetricError, match="fid.*known: .*fd_fmnist"):
        check_metric_names(["fid"])
    with pytest.raises(UnknownMetricError):
        check_metric_names([])


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="metric 'fd_fmnist' is registered twice"):
        register_metric("fd_fmnist", results={})(lambda ctx: {})


def test_register_metric_records_what_it_is_given():
    def fn(ctx):
        return {"x": 1.0}

    try:
        meaning = {"x": "what x means"}
        decorate = register_metric(
            "test-x", reference="vector", needs_encoder=True, results=meaning
        )
        assert decorate(fn) is fn
        assert METRICS["test-x"] == Metric("test-x", fn, "vector", True, {"x": "what x means"})
        assert register_metric("test-y", results={})(fn) is fn
        assert METRICS["test-y"] == Metric("test-y", fn, None, False, {})
    finally:
        METRICS.pop("test-x", None), METRICS.pop("test-y", None)


def test_metrics_that_do_not_apply_are_skipped_with_a_note():
    z_dim = 2
    model = GenerativeModel(lambda z: z @ np.ones((z_dim, 3), np.float32), None, z_dim, (3,))
    ref = Reference("vector", np.random.default_rng(0).standard_normal((100, 3)), "test")
    ctx = EvalContext(model, ref, num_samples=100)
    results = compute_metrics(ctx, ["energy_distance", "reconstruction", "fd_fmnist"])
    assert set(results) == {"energy_distance"}
    assert any("reconstruction skipped" in n for n in ctx.notes)
    assert any("fd_fmnist skipped" in n for n in ctx.notes)


def test_eval_rejects_unknown_metric_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tmp_path), "--metrics", "fd_fmnist,fid"])
    assert result.exit_code == 2
    assert "unknown metric(s) fid" in result.output


def test_eval_every_is_checked():
    cfg = from_preset("tiny")
    cfg.train.eval_every = 7  # log_every is 5
    with pytest.raises(ConfigError, match="train.eval_every"):
        validate(cfg)
    cfg.train.eval_every, cfg.train.eval_samples = 10, 5
    with pytest.raises(ConfigError, match="train.eval_samples"):
        validate(cfg)


# --- the classifier -------------------------------------------------------------------------


def test_shipped_classifier_matches_its_record():
    import hashlib

    info = classifier_info()
    assert info["test_accuracy"] >= 0.92
    assert info["sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert WEIGHTS.stat().st_size < 4 * 2**20
    net = load_classifier()
    feats = net.features(torch.zeros(2, 1, 28, 28))
    assert feats.shape == (2, 128)


# --- aegan eval on runs and bundles ---------------------------------------------------------


def _tiny_run(run_dir: Path, mode: str, **train: int) -> Path:
    from training.training_loop import train as run_training

    cfg = from_preset("tiny")
    cfg.loss.mode = mode
    cfg.train.progress = False
    for key, value in train.items():
        setattr(cfg.train, key, value)
    run_training(validate(cfg), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def aegan_run(tmp_path_factory) -> Path:
    return _tiny_run(tmp_path_factory.mktemp("runs") / "aegan", "aegan")


@needs_fmnist
def test_eval_on_a_tiny_run_prints_table_and_writes_json(aegan_run, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", str(aegan_run), "--json", str(out), "--num-samples", "200"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for key in ("fd_fmnist", "precision", "recall", "coverage_kl", "recon_psnr", "latent_mse"):
        assert key in result.output
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert report["step"] == 20 and report["mode"] == "aegan" and report["num_samples"] == 200
    assert metrics["fd_fmnist"] > 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert 1 <= metrics["coverage_classes"] <= 10
    assert 0 < metrics["recon_mse"] < 1 and metrics["recon_psnr"] > 0
    assert len(report["details"]["class_shares"]) == 10
    assert report["classifier"]["test_accuracy"] >= 0.92


@needs_fmnist
def test_eval_is_deterministic_and_metrics_can_be_chosen(aegan_run, tmp_path):
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        args = ["eval", str(aegan_run), "--metrics", "coverage,fd_fmnist"]
        result = CliRunner().invoke(main, [*args, "--num-samples", "100", "--json", str(out)])
        assert result.exit_code == 0, result.output
    a, b = (json.loads(p.read_text())["metrics"] for p in outs)
    assert a == b
    assert set(a) == {"coverage_kl", "coverage_classes", "fd_fmnist"}


@needs_fmnist
def test_eval_of_a_gan_run_skips_reconstruction(tmp_path):
    run = _tiny_run(tmp_path / "gan", "gan", steps=10)
    out = tmp_path / "eval.json"
    args = ["eval", str(run), "--num-samples", "100", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert "fd_fmnist" in report["metrics"] and "recon_mse" not in report["metrics"]
    assert any("reconstruction skipped" in n and "gan" in n for n in report["notes"])
    assert "reconstruction skipped" in result.output


@needs_fmnist
def test_eval_on_an_image_bundle(tmp_path):
    from bundle_factory import write_bundle

    bundle = write_bundle(tmp_path / "bundle")
    out = tmp_path / "eval.json"
    args = ["eval", str(bundle), "--num-samples", "100", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["bundle"] == str(bundle)
    assert {"fd_fmnist", "recall", "recon_psnr", "latent_mse"} <= set(report["metrics"])
    # The test bundle's encoder inverts its generator on the generator's own samples.
    assert report["metrics"]["latent_mse"] < 1e-3


def test_eval_on_a_vector_bundle_with_held_out_data(tmp_path):
    from bundle_factory import write_bundle

    bundle = write_bundle(tmp_path / "bundle", kind="vector", shape=(6,), latent_dim=3)
    data = tmp_path / "held_out.npy"
    np.save(data, np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32))
    out = tmp_path / "eval.json"
    args = ["eval", str(bundle), "--data", str(data), "--num-samples", "200", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"energy_distance", "recon_mse", "latent_mse"}
    assert report["metrics"]["energy_distance"] > 0
    assert report["classifier"] is None  # no classifier-feature metric ran


# --- during training ------------------------------------------------------------------------


@needs_fmnist
@pytest.mark.slow
def test_training_hook_logs_metrics_without_changing_training(tmp_path):
    from training.evaluate import make_eval_hook
    from training.training_loop import train as run_training

    def config(eval_every: int) -> RunConfig:
        cfg = from_preset("tiny")
        cfg.train.progress = False
        cfg.train.eval_every, cfg.train.eval_samples = eval_every, 100
        return validate(cfg)

    with_hook = config(10)
    assert make_eval_hook(config(0)) is None
    path_a = run_training(with_hook, tmp_path / "a", eval_hook=make_eval_hook(with_hook))
    path_b = run_training(config(0), tmp_path / "b")
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    evaluated = {r["step"]: r for r in records if "eval/fd_fmnist" in r}
    assert sorted(evaluated) == [10, 20]
    assert {"eval/coverage_kl", "eval/recall", "eval/recon_psnr", "eval/seconds"} <= set(
        evaluated[20]
    )
    # The hook draws its own noise and restores train mode: training is unchanged.
    a = torch.load(path_a, weights_only=True)["ema"]["G"]
    b = torch.load(path_b, weights_only=True)["ema"]["G"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_fmnist
def test_shipped_classifier_report_matches_its_record():
    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    result = report(str(FMNIST))
    assert result["test_accuracy"] == record["test_accuracy"] >= 0.92
    recalls = result["test_recall_per_class"]
    assert len(recalls) == 10 and all(0 <= r <= 1 for r in recalls.values())
    # class sizes are equal in the test split, so accuracy is the mean of per-class recall
    assert math.isclose(sum(recalls.values()) / 10, result["test_accuracy"], abs_tol=1e-3)
