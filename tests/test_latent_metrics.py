"""The latents' measures beside a PCA of the same size, and the quality report for a model of the
user's own images (held-out split, PCA-space sample quality, ``--compare``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fmnist_data import FMNIST, needs_fmnist
from PIL import Image

from aegan_cli import main
from training.config import ConfigError, from_preset, validate
from training.data import image_paths, is_held_out, load_dataset, load_image_folder
from training.metrics import METRICS, EvalContext, GenerativeModel, Reference, compute_metrics
from training.metrics.latents import fit_pca, knn_accuracy, pca_scores, probe_accuracy

# --- the measures ---------------------------------------------------------------------------


def _clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)) * 10
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + spread * rng.standard_normal((len(labels), dim)), labels


def test_knn_is_perfect_on_separated_clusters_and_chance_on_shuffled_labels():
    train, train_labels = _clusters(50, 4, 8, 0.5, 0)
    test, test_labels = _clusters(20, 4, 8, 0.5, 0)  # same centres (same seed), new draws
    for metric in ("euclidean", "cosine"):
        assert knn_accuracy(train, train_labels, test, test_labels, metric=metric) == 1.0
    shuffled = np.random.default_rng(1).permutation(train_labels)
    assert knn_accuracy(train, shuffled, test, test_labels) < 0.5


def test_knn_votes_by_majority_and_breaks_ties_towards_the_smallest_label():
    # One test point at 0; its 4 nearest training points: two of class 3 (nearest), two of class 1.
    train = np.array([[0.1], [0.2], [0.3], [0.4], [9.0]])
    labels = np.array([3, 3, 1, 1, 2])
    assert knn_accuracy(train, labels, np.zeros((1, 1)), np.array([1]), k=4) == 1.0
    assert knn_accuracy(train, labels, np.zeros((1, 1)), np.array([3]), k=4) == 0.0
    # k = 3: class 3 has the majority.
    assert knn_accuracy(train, labels, np.zeros((1, 1)), np.array([3]), k=3) == 1.0


def test_cosine_knn_ignores_the_norm_and_euclidean_does_not():
    # Class by direction: 0 along (1, 0) near the origin, 1 along (1, 1) far out. The test point
    # points along class 0 (14 degrees) but lies nearer class 1's points.
    train = np.array([[1.0, 0.0], [2.0, 0.0], [10.0, 10.0], [20.0, 20.0]])
    labels = np.array([0, 0, 1, 1])
    test, test_labels = np.array([[12.0, 3.0]]), np.array([0])
    assert knn_accuracy(train, labels, test, test_labels, k=1, metric="cosine") == 1.0
    assert knn_accuracy(train, labels, test, test_labels, k=1, metric="euclidean") == 0.0


def test_linear_probe_separates_linear_classes_and_not_xor():
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (400, 2))
    linear = (x[:, 0] > 0).astype(int)
    assert probe_accuracy(x[:300], linear[:300], x[300:], linear[300:]) > 0.95
    xor = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(int)
    assert probe_accuracy(x[:300], xor[:300], x[300:], xor[300:]) < 0.7


def test_pca_reconstructs_data_of_its_rank_exactly_and_orders_components():
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.standard_normal((16, 3)))[0].T  # 3 orthonormal rows in 16-D
    codes = rng.standard_normal((200, 3)) * np.array([0.3, 0.2, 0.1])
    images = (codes @ basis).reshape(200, 1, 4, 4) * 0.5  # in [-1, 1]
    pca = fit_pca(images, 3)
    assert np.all(np.diff(pca.variances) <= 0)
    rebuilt = pca.decode(pca.codes(images), (1, 4, 4))
    assert np.abs(rebuilt - images).max() < 1e-9
    assert (
        np.abs(
            fit_pca(images, 1).decode(fit_pca(images, 1).codes(images), (1, 4, 4)) - images
        ).max()
        > 1e-3
    )


def _labelled_reference(rng: np.random.Generator) -> Reference:
    """Four classes of 8x8 grey images: a bright quadrant each, plus noise."""

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 4, n)
        images = -np.ones((n, 1, 8, 8), dtype=np.float32)
        for i, c in enumerate(labels):
            r, k = divmod(int(c), 2)
            images[i, 0, 4 * r : 4 * r + 4, 4 * k : 4 * k + 4] = 0.8
        images += 0.3 * rng.standard_normal(images.shape).astype(np.float32)
        return np.clip(images, -1, 1), labels

    test, test_labels = draw(120)
    train, train_labels = draw(400)
    return Reference(
        "fmnist",
        test,
        "quadrants",
        labels=test_labels,
        training_split=lambda: (train, train_labels),
    )


def test_latents_metric_reports_the_encoder_beside_pca_and_caches_pca():
    ref = _labelled_reference(np.random.default_rng(4))
    quadrant_means = lambda x: x.reshape(len(x), 2, 4, 2, 4).mean(axis=(2, 4)).reshape(len(x), 4)  # noqa: E731
    informative = GenerativeModel(
        lambda z: np.zeros((len(z), 1, 8, 8), np.float32), quadrant_means, 4, (1, 8, 8)
    )
    useless = GenerativeModel(
        informative.generate,
        lambda x: np.random.default_rng(0).standard_normal((len(x), 4)),
        4,
        (1, 8, 8),
    )
    good = compute_metrics(EvalContext(informative, ref, 120), ["latents"])
    bad = compute_metrics(EvalContext(useless, ref, 120), ["latents"])
    assert good["latent_knn_euclidean"] == good["latent_knn_cosine"] == 1.0
    assert good["latent_probe"] == 1.0
    assert bad["latent_knn_euclidean"] < 0.5 and bad["latent_probe"] < 0.5
    # PCA-4 finds the quadrants too; its row does not depend on the model and is cached.
    assert good["pca_knn_euclidean"] > 0.95 and good["pca_recon_psnr"] > 10
    assert {k: v for k, v in good.items() if k.startswith("pca_")} == {
        k: v for k, v in bad.items() if k.startswith("pca_")
    }
    assert ("pca_scores", 4, 120) in ref.cache and ("pca", 4) in ref.cache


def test_latents_metric_needs_an_encoder_and_labels():
    ref = _labelled_reference(np.random.default_rng(5))
    gan = GenerativeModel(lambda z: np.zeros((len(z), 1, 8, 8), np.float32), None, 4, (1, 8, 8))
    ctx = EvalContext(gan, ref, 50)
    assert compute_metrics(ctx, ["latents"]) == {}
    assert any("latents skipped" in n for n in ctx.notes)
    unlabelled = Reference("fmnist", ref.samples, "no labels")
    encoder = GenerativeModel(gan.generate, lambda x: x.reshape(len(x), -1)[:, :4], 4, (1, 8, 8))
    ctx = EvalContext(encoder, unlabelled, 50)
    assert compute_metrics(ctx, ["latents"]) == {}
    assert any("no labels" in n for n in ctx.notes)


@needs_fmnist
@pytest.mark.slow
def test_pca_32_of_fashion_mnist_reproduces_the_recorded_baseline():
    """docs/RESULTS.md: PCA-32 of the training pixels, test split: 18.97 dB, 10-NN 0.853 / 0.856,
    probe 0.760."""
    from training.evaluate import fmnist_reference

    scores = pca_scores(fmnist_reference(str(FMNIST)), 32, 10_000)
    assert scores["pca_recon_psnr"] == pytest.approx(18.97, abs=0.01)
    assert scores["pca_knn_euclidean"] == pytest.approx(0.853, abs=0.001)
    assert scores["pca_knn_cosine"] == pytest.approx(0.856, abs=0.001)
    assert scores["pca_probe"] == pytest.approx(0.760, abs=0.001)


# --- held-out split of an image folder ------------------------------------------------------


def _rgb_folder(root: Path, count: int, size: int = 16, seed: int = 0) -> Path:
    """Coloured discs on a dark background, in two sub-folders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        colour = rng.uniform(80, 255, 3)
        cy, cx, r = rng.uniform(4, size - 4, 2).tolist() + [rng.uniform(2, 5)]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)[..., None]
        pixels = np.where(disc, colour, 20).astype(np.uint8)
        folder = root / f"part{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


def test_held_out_split_is_deterministic_disjoint_and_stable_when_images_are_added(tmp_path):
    root = _rgb_folder(tmp_path / "imgs", 60)
    held = image_paths(root, "held-out", 0.25)
    train = image_paths(root, "train", 0.25)
    assert set(held).isdisjoint(train) and len(held) + len(train) == 60
    assert 5 <= len(held) <= 25  # ~15 expected
    assert held == image_paths(root, "held-out", 0.25)
    _rgb_folder(tmp_path / "more", 30, seed=1)
    for path in (tmp_path / "more").rglob("*.png"):
        path.rename(root / path.parent.name / f"new-{path.name}")
    assert set(held) <= set(image_paths(root, "held-out", 0.25))
    assert not is_held_out("a.png", 0.0) and is_held_out("a.png", 0.999999)


def test_training_on_an_image_folder_leaves_out_its_held_out_share(tmp_path):
    root = _rgb_folder(tmp_path / "imgs", 40)
    cfg = from_preset("tiny")
    cfg.data.source, cfg.data.channels, cfg.data.image_size, cfg.data.limit = str(root), 3, 28, None
    cfg.data.held_out = 0.25
    data = load_dataset(cfg.data)
    assert len(data) == len(image_paths(root, "train", 0.25)) < 40
    cfg.data.held_out = 0.0
    assert len(load_dataset(cfg.data)) == 40
    cfg.data.held_out = 1.0
    with pytest.raises(ConfigError, match="data.held_out"):
        validate(cfg)


def test_an_empty_split_is_named(tmp_path):
    root = _rgb_folder(tmp_path / "imgs", 2)
    from training.data import DataError

    with pytest.raises(DataError, match="held-out split is empty"):
        load_image_folder(root, 28, 3, split="held-out", held_out=1e-9)


# --- aegan eval on a model of an image folder -----------------------------------------------


def _folder_run(run_dir: Path, root: Path, mode: str) -> Path:
    from training.training_loop import train as run_training

    cfg = from_preset("tiny")
    cfg.data.source, cfg.data.channels, cfg.data.image_size, cfg.data.limit = str(root), 3, 28, None
    cfg.data.held_out = 0.3
    cfg.loss.mode = mode
    cfg.train.steps, cfg.train.batch_size, cfg.train.progress = 6, 8, False
    cfg.train.image_every = cfg.train.checkpoint_every = 0
    run_training(validate(cfg), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("folder-runs")
    root = _rgb_folder(base / "imgs", 80)
    return root, _folder_run(base / "aegan", root, "aegan"), _folder_run(base / "gan", root, "gan")


def test_eval_of_an_image_folder_run_reports_held_out_quality_beside_the_gan(folder_runs, tmp_path):
    root, aegan_run, gan_run = folder_runs
    out = tmp_path / "eval.json"
    args = ["eval", str(aegan_run), "--compare", str(gan_run), "--num-samples", "200"]
    result = CliRunner().invoke(main, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    metrics, held = report["metrics"], len(image_paths(root, "held-out", 0.3))
    assert "held-out split" in report["reference"] and metrics["heldout_images"] == held
    assert metrics["recon_psnr"] > 0 and metrics["pca_recon_psnr"] > metrics["recon_psnr"] - 30
    assert metrics["heldout_fd_pca"] > 0 and 0 <= metrics["heldout_recall"] <= 1
    other = report["compare"]["metrics"]
    assert report["compare"]["mode"] == "gan" and "recon_psnr" not in other
    assert other["heldout_fd_pca"] > 0 and other["heldout_fd_pca"] != metrics["heldout_fd_pca"]
    # The output says what the numbers can and cannot tell, and sets the encoder beside PCA.
    assert "cannot tell" in result.output and "PCA-8 of the pixels" in result.output
    assert "fd_fmnist" not in metrics


def test_eval_with_another_folder_holds_it_out_whole(folder_runs, tmp_path):
    _, aegan_run, _ = folder_runs
    other = _rgb_folder(tmp_path / "new", 12, seed=3)
    out = tmp_path / "eval.json"
    args = ["eval", str(aegan_run), "--data", str(other), "--num-samples", "50"]
    result = CliRunner().invoke(main, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["metrics"]["heldout_images"] == 12


def test_held_out_figures_need_enough_images():
    images = np.zeros((4, 3, 8, 8), np.float32)
    model = GenerativeModel(lambda z: np.zeros((len(z), 3, 8, 8), np.float32), None, 2, (3, 8, 8))
    ctx = EvalContext(model, Reference("images", images, "four"), 20)
    assert METRICS["heldout_images"].fn(ctx) == {}
    assert any("only 4 held-out" in n for n in ctx.notes)


def test_a_run_that_held_out_nothing_says_so_and_old_configs_resume_without_a_split(
    folder_runs, tmp_path
):
    from training.checkpoint import run_config
    from training.evaluate import pick_reference

    root, aegan_run, _ = folder_runs
    config = json.loads((aegan_run / "config.json").read_text())
    config["data"]["held_out"] = 0.0
    notes: list[str] = []
    assert pick_reference((3, 28, 28), config, None, notes) is None
    assert "trained on every image" in notes[0] and "--data DIR" in notes[0]
    del config["data"]["held_out"]  # a run from before the setting
    assert run_config(config, "old run").data.held_out == 0.0
