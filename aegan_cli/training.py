"""``aegan train``, ``export``, ``directions``, ``eval`` and ``classifier``: a model's stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from training.presets import DEFAULT_NUM_SAMPLES, DEFAULT_PRESET, PRESETS

if TYPE_CHECKING:
    from training.config import RunConfig

from .base import main, needs_extras, setup_logging

# --- aegan train ----------------------------------------------------------------------------


@main.command()
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=None,
    help=f"Named starting config (default {DEFAULT_PRESET}).",
)
@click.option(
    "--data",
    "source",
    default=None,
    help="'fashion-mnist', a folder of images, an .npy file, or a built-in mixture of Gaussians "
    "'mixture:NAME' (ring8, grid25, embedded10).",
)
@click.option(
    "--mode",
    type=click.Choice(["aegan", "gan"]),
    default=None,
    help="aegan (G, E, Dx, Dz) or the plain-GAN baseline.",
)
@click.option("--arch", type=click.Choice(["conv", "mlp"]), default=None, help="Network family.")
@click.option("--steps", type=int, default=None, help="Optimiser steps.")
@click.option(
    "--encoder-stage-steps",
    type=click.IntRange(min=0),
    default=None,
    help="Steps of E alone against the frozen EMA generator after the joint steps "
    "(train.encoder_stage_steps); with --resume, adds or lengthens the stage of a run.",
)
@click.option("--batch-size", type=int, default=None, help="Samples per step per process.")
@click.option("--seed", type=int, default=None, help="Seed of initialisation, data order, noise.")
@click.option("--latent-dim", type=int, default=None, help="Dimension of z.")
@click.option("--width", type=int, default=None, help="conv: base channel width.")
@click.option("--image-size", type=int, default=None, help="Image folders: side in pixels.")
@click.option("--channels", type=int, default=None, help="Image folders: 1 (grey) or 3 (RGB).")
@click.option(
    "--on-bad-file",
    type=click.Choice(["fail", "skip"]),
    default=None,
    help="Image folders: fail on an unreadable image, or skip it and report.",
)
@click.option("--limit", type=int, default=None, help="Use only the first N samples.")
@click.option("--fashion-mnist-dir", default=None, help="Directory of the Fashion-MNIST IDX files.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option(
    "--device",
    default=None,
    help="auto (CUDA when torch sees a GPU, the default), cpu, cuda or cuda:N; with --resume, "
    "moves the run.",
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="SECTION.FIELD=VALUE",
    help="Set any config field, e.g. --set loss.recon_x=2 (repeatable; checked against the "
    "field's type).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory (default runs/PRESET-MODE-seedN).",
)
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    default=None,
    help="Continue RUN_DIR from its newest loadable checkpoint (--steps may extend it).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@needs_extras
def train(
    preset: str | None,
    source: str | None,
    mode: str | None,
    arch: str | None,
    steps: int | None,
    encoder_stage_steps: int | None,
    batch_size: int | None,
    seed: int | None,
    latent_dim: int | None,
    width: int | None,
    image_size: int | None,
    channels: int | None,
    on_bad_file: str | None,
    limit: int | None,
    fashion_mnist_dir: str | None,
    threads: int | None,
    device: str | None,
    assignments: tuple[str, ...],
    out: Path | None,
    resume: Path | None,
    no_progress: bool,
    dry_run: bool,
) -> None:
    """Train an AEGAN (or the GAN baseline); writes grids, metrics.jsonl and checkpoints."""
    setup_logging()
    if resume is not None:
        from training.checkpoint import resume_point

        if dry_run:
            _, raw_config = resume_point(resume)
            click.echo(json.dumps(raw_config, indent=2))
            return
        from training.evaluate import eval_hook_for_run
        from training.training_loop import train as run_training

        hook = eval_hook_for_run(resume)
        run_training(
            None,
            resume,
            resume=True,
            steps=steps,
            device=device,
            eval_hook=hook,
            encoder_stage_steps=encoder_stage_steps,
        )
        return
    cfg = _train_config(
        preset,
        {
            ("data", "source"): source,
            ("data", "image_size"): image_size,
            ("data", "channels"): channels,
            ("data", "on_bad_file"): on_bad_file,
            ("data", "limit"): limit,
            ("data", "fashion_mnist_dir"): fashion_mnist_dir,
            ("model", "arch"): arch,
            ("model", "latent_dim"): latent_dim,
            ("model", "width"): width,
            ("loss", "mode"): mode,
            ("train", "steps"): steps,
            ("train", "encoder_stage_steps"): encoder_stage_steps,
            ("train", "batch_size"): batch_size,
            ("train", "seed"): seed,
            ("train", "threads"): threads,
            ("train", "device"): device,
            ("train", "progress"): False if no_progress else None,
        },
        assignments,
    )
    out = out or Path("runs") / f"{cfg.preset}-{cfg.loss.mode}-seed{cfg.train.seed}"
    if dry_run:
        click.echo(json.dumps({"run_dir": str(out), **cfg.to_dict()}, indent=2))
        return
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise click.UsageError(f"--out: {out} already holds checkpoints; use --resume {out}")
    from training.evaluate import make_eval_hook
    from training.training_loop import train as run_training

    path = run_training(cfg, out, eval_hook=make_eval_hook(cfg))
    if path is not None:
        click.echo(f"final checkpoint: {path}")


def _train_config(
    preset: str | None, flags: dict[tuple[str, str], Any], assignments: tuple[str, ...]
) -> RunConfig:
    """Preset, then the named flags, then ``--set`` assignments; validated once."""
    from training.config import apply_assignment, from_preset, validate

    cfg = from_preset(preset or DEFAULT_PRESET)
    for (section, name), value in flags.items():
        if value is not None:
            setattr(getattr(cfg, section), name, value)
    for assignment in assignments:
        apply_assignment(cfg, assignment)
    return validate(cfg)


# --- aegan export, aegan directions ---------------------------------------------------------


@main.command("export")
@click.argument("source", metavar="RUN_DIR_OR_CHECKPOINT", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle directory to create (built beside it, moved into place when verified).",
)
@click.option("--name", default=None, help="Model name in the manifest (default: the run's name).")
@click.option("--no-fp16", is_flag=True, help="Skip the float16 graphs for GPU serving.")
@click.option(
    "--metrics-json",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="JSON object of evaluation metrics to record (merged over RUN_DIR/eval.json).",
)
@click.option(
    "--bentoml-name",
    default=None,
    help="Also save the bundle in the BentoML model store under this name.",
)
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@needs_extras
def export_command(
    source: Path,
    out: Path,
    name: str | None,
    no_fp16: bool,
    metrics_json: Path | None,
    bentoml_name: str | None,
    force: bool,
) -> None:
    """Export a run's EMA generator and encoder to a verified ONNX bundle.

    RUN_DIR_OR_CHECKPOINT is a run directory (its newest loadable checkpoint is used) or one
    checkpoint file. The networks are rebuilt from the checkpoint's own config; each graph is
    checked against PyTorch with ONNX Runtime before the bundle is written.
    """
    from aegan_core.bundle import load_bundle
    from export.bundle_writer import export_bundle, read_metrics_file

    metrics = read_metrics_file(metrics_json) if metrics_json is not None else None
    bundle_dir = export_bundle(
        source,
        out,
        name=name,
        fp16=not no_fp16,
        metrics=metrics,
        bentoml_name=bentoml_name,
        force=force,
    )
    bundle = load_bundle(bundle_dir)

    m = bundle.manifest
    shape = "x".join(str(d) for d in bundle.data_shape)
    click.echo(
        f"bundle {bundle_dir}: {m['name']!r}, {bundle.kind} {shape}, latent {bundle.latent_dim}, "
        f"step {m['step']}, opset {m['opset']}"
    )
    for role, entry in m["files"].items():
        record = m["parity"][role]
        measured = ", ".join(
            f"{provider.removesuffix('ExecutionProvider')} {error:.2g}"
            for provider, error in record["max_abs_error"].items()
        )
        skipped = "".join(
            f"; {provider.removesuffix('ExecutionProvider')} skipped: {reason}"
            for provider, reason in record.get("skipped", {}).items()
        )
        click.echo(
            f"  {entry['path']:<20} max abs error {measured or 'not measured'} "
            f"(tolerance {record['tolerance']:.2g}){skipped}"
        )
    if bentoml_name is not None:
        import bentoml

        click.echo(f"BentoML model: {bentoml.models.get(bentoml_name).tag}")


@main.command("directions")
@click.argument("bundle_dir", metavar="BUNDLE_DIR", type=click.Path(path_type=Path))
@click.option(
    "--data",
    default=None,
    help="Training data: fashion-mnist, an image folder or a .npy file (default: the data named "
    "in the bundle's training_config).",
)
@click.option(
    "--fashion-mnist-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Directory of the Fashion-MNIST IDX .gz files (default: $AEGAN_FASHION_MNIST_DIR or "
    "Debian's).",
)
@click.option("--limit", type=click.IntRange(min=2), default=None, help="Use the first N samples.")
@needs_extras
def directions_command(
    bundle_dir: Path, data: str | None, fashion_mnist_dir: Path | None, limit: int | None
) -> None:
    """Add latent directions to an existing bundle (``aegan export`` adds them itself).

    Runs the bundle's own ONNX encoder over the training data and stores the principal components
    of the latents, with their variances, in BUNDLE_DIR/directions.json; the manifest records its
    SHA-256 and keeps everything else. The explorer page (/ui) edits latents along them.
    """
    from dataclasses import replace

    from aegan_core.bundle import load_bundle
    from export.directions import add_directions, bundle_data_config, training_samples
    from training.config import DataConfig

    bundle = load_bundle(bundle_dir)
    cfg = bundle_data_config(bundle) if data is None else DataConfig(source=data)
    if fashion_mnist_dir is not None:
        cfg = replace(cfg, fashion_mnist_dir=str(fashion_mnist_dir))
    if limit is not None:
        cfg = replace(cfg, limit=limit)
    samples, described = training_samples(cfg)
    bundle = add_directions(bundle_dir, samples, described)
    d = bundle.directions
    assert d is not None
    share = d.variances / max(d.total_variance, 1e-30)
    first = ", ".join(f"{100 * v:.1f}" for v in share[:5])
    agreement = ", ".join(f"{c:.2f}" for c in bundle.manifest["directions"]["split_half_cosine"])
    click.echo(
        f"{bundle_dir}: {len(d.variances)} directions from {d.samples} latents of {d.data}\n"
        f"  variance explained by the first {min(5, len(share))}: {first} % (first 8 together: "
        f"{100 * share[:8].sum():.1f} %; {100 / len(d.mean):.1f} % each if the latents were "
        "isotropic)\n"
        f"  split-half |cos| of the leading components: {agreement}"
    )


# --- aegan eval -----------------------------------------------------------------------------


@main.command("eval")
@click.argument("source", type=click.Path(exists=True, path_type=Path), required=False)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the results to this JSON file.",
)
@click.option(
    "--metrics",
    default=None,
    metavar="A,B",
    help="Comma-separated metric names (default: all that apply; --list names them).",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=10),
    default=DEFAULT_NUM_SAMPLES,
    show_default=True,
    help="Generated samples (and held-out samples compared).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the latent draw.")
@click.option(
    "--data",
    default=None,
    help="Held-out data: a folder of images (the run's own training folder: its held-out split), "
    "an .npy of vectors (with FILE.modes.json beside it, the mode metrics too) or 'mixture:NAME'.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option(
    "--compare",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A second run or bundle (a plain GAN, say) measured on the same data beside SOURCE.",
)
@click.option("--list", "list_metrics", is_flag=True, help="List the metrics and exit.")
@needs_extras
def eval_command(
    source: Path | None,
    json_path: Path | None,
    metrics: str | None,
    num_samples: int,
    seed: int,
    data: str | None,
    threads: int | None,
    compare: Path | None,
    list_metrics: bool,
) -> None:
    """Measure a run (EMA weights of its newest checkpoint) or an ONNX bundle: FD-FMNIST,
    precision, recall, class coverage, reconstruction and the latents' k-NN and linear-probe
    accuracy beside a PCA of the same size; for a model of an image folder, reconstruction of its
    held-out images and sample quality in their PCA space; energy distance for vector data, and
    mode coverage where the data declares its modes."""
    from training.evaluate import print_report, run_evaluation
    from training.metrics import check_metric_names, result_meanings

    if list_metrics:
        for key, meaning in result_meanings().items():
            click.echo(f"{key}: {meaning}")
        return
    # before anything is loaded: a typo fails in milliseconds
    names = check_metric_names(metrics.split(",")) if metrics is not None else None
    if source is None:
        raise click.UsageError("Missing argument 'SOURCE' (a run directory, checkpoint or bundle).")
    report = run_evaluation(source, names, num_samples, seed, data, threads, compare)
    print_report(report, f"{source} (step {report.get('step')}, {num_samples} samples)")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")


# --- aegan classifier -----------------------------------------------------------------------


@main.command("classifier")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Weights file; the record goes beside it as .json (default: the shipped weights).",
)
@click.option("--fashion-mnist-dir", default=None, help="Directory of the Fashion-MNIST IDX files.")
@click.option("--epochs", type=click.IntRange(min=1), default=7, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=1, show_default=True, help="CPU threads."
)
@click.option(
    "--report",
    "report_only",
    is_flag=True,
    help="Do not train: print parameters, test accuracy and per-class recall of --out.",
)
@needs_extras
def classifier_command(
    out: Path | None,
    fashion_mnist_dir: str | None,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    threads: int,
    report_only: bool,
) -> None:
    """Train the Fashion-MNIST feature classifier of the image metrics and record its accuracy."""
    from training.config import DataConfig
    from training.config import fashion_mnist_dir as resolve_dir
    from training.metrics import classifier

    if report_only:
        data_dir = resolve_dir(DataConfig(fashion_mnist_dir=fashion_mnist_dir))
        record = classifier.report(data_dir, str(out) if out else None, threads=threads)
    else:
        record = classifier.train_and_record(
            out, fashion_mnist_dir, epochs, batch_size, lr, seed, threads, log=click.echo
        )
    click.echo(json.dumps(record, indent=2))
