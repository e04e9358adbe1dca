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
