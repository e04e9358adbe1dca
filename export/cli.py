"""``aegan export RUN_DIR_OR_CHECKPOINT --out BUNDLE_DIR``: the command line of :mod:`export`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
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
    from aegan_serve.bundle import BundleError, load_bundle
    from export.bundle_writer import export_bundle, read_metrics_file
    from export.onnx_export import ExportError
    from training.checkpoint import CheckpointError

    try:
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
    except (CheckpointError, ExportError, BundleError) as exc:
        raise click.ClickException(str(exc)) from exc

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


@click.command("directions")
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
def directions_command(
    bundle_dir: Path, data: str | None, fashion_mnist_dir: Path | None, limit: int | None
) -> None:
    """Add latent directions to an existing bundle (``aegan export`` adds them itself).

    Runs the bundle's own ONNX encoder over the training data and stores the principal components
    of the latents, with their variances, in BUNDLE_DIR/directions.json; the manifest records its
    SHA-256 and keeps everything else. The explorer page (/ui) edits latents along them.
    """
    from dataclasses import replace

    from aegan_serve.bundle import BundleError, load_bundle
    from export.directions import add_directions, bundle_data_config, training_samples
    from training.config import DataConfig
    from training.data import DataError

    try:
        bundle = load_bundle(bundle_dir)
        cfg = bundle_data_config(bundle) if data is None else DataConfig(source=data)
        if fashion_mnist_dir is not None:
            cfg = replace(cfg, fashion_mnist_dir=str(fashion_mnist_dir))
        if limit is not None:
            cfg = replace(cfg, limit=limit)
        samples, described = training_samples(cfg)
        bundle = add_directions(bundle_dir, samples, described)
    except (BundleError, DataError) as exc:
        raise click.ClickException(str(exc)) from exc
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
