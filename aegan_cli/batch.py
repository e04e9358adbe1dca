"""``aegan encode``, ``index`` and ``similar``: batch jobs over collections of inputs."""

from __future__ import annotations

from pathlib import Path

import click

from .base import main, needs_extras

# --- aegan encode ---------------------------------------------------------------------------


@main.command("encode")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--model",
    default=None,
    help="Bundle directory, or bentoml:NAME[:VERSION] (default: the shipped model).",
)
@click.option(
    "--out",
    "dest",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory of Parquet parts to write (a name ending in .parquet is a directory too).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker threads or processes, or Ray actors (default: one per available CPU; one "
    "process on a GPU; on Ray, one actor per CPU of the cluster, or per GPU when it has GPUs).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per encoder run (default: 256; 1024 on a Ray actor with a GPU).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Inputs per Parquet part (the unit of restart).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="ONNX Runtime execution provider, as AEGAN_DEVICE for the service.",
)
@click.option(
    "--pool",
    type=click.Choice(["threads", "processes"]),
    default="processes",
    show_default=True,
    help="Local workers: processes with an ONNX Runtime session each (the faster on the "
    "project's 2 cores: docs/BENCHMARKS.md), or threads sharing one session.",
)
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Data, on a Ray started here.")
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="Run on Ray Data on this cluster (ray://HOST:10001, HOST:6379, or auto); implies --ray.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@needs_extras
def encode_command(
    source: Path,
    model: str | None,
    dest: Path,
    workers: int | None,
    batch_size: int | None,
    chunk_size: int,
    device: str,
    pool: str,
    use_ray: bool,
    ray_address: str | None,
    no_progress: bool,
) -> None:
    """Encode a collection into latents with the service's preprocessing and ONNX encoder.

    SOURCE is a folder of images (recursive: PNG, JPEG, WebP, GIF, BMP), a text file listing one
    image path per line, or an .npy array. DEST gets one Parquet part per --chunk-size inputs,
    with the columns id, latent and error (an input that cannot be read is a row with its error,
    never the end of the job), and _job.json. Run the same command again to finish an interrupted
    job: parts already written are skipped.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from aegan_batch import (
        default_workers,
        plan_job,
        run_job,
        run_job_on_ray,
    )
    from aegan_batch.on_ray import CPU_BATCH_SIZE
    from aegan_core.bundle import DEFAULT_MODEL_DIR

    if use_ray or ray_address is not None:
        import ray.data  # noqa: F401  (before any work: the 'ray' extra may be missing)
    plan = plan_job(source, model or DEFAULT_MODEL_DIR, dest, chunk_size)
    done = len(plan.inputs) - plan.pending_inputs
    if done:
        click.echo(
            f"{dest}: {plan.parts - len(plan.missing)} of {plan.parts} parts already written "
            f"({done} inputs), skipped"
        )
    columns = (
        TextColumn("encoding"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    console = Console(stderr=True)
    with Progress(
        *columns, console=console, disable=no_progress or not console.is_terminal, transient=True
    ) as bar:
        task = bar.add_task("encode", total=plan.pending_inputs)

        def advance(count: int) -> None:
            bar.advance(task, count)

        try:
            if use_ray or ray_address is not None:
                summary = run_job_on_ray(
                    plan,
                    address=ray_address,
                    workers=workers,
                    batch_size=batch_size,
                    device=device,
                    progress=advance,
                )
            else:
                summary = run_job(
                    plan,
                    workers=workers or default_workers(device, pool),  # type: ignore[arg-type]
                    batch_size=batch_size or CPU_BATCH_SIZE,
                    device=device,
                    pool=pool,  # type: ignore[arg-type]
                    progress=advance,
                )
        finally:
            plan.release()
    for name, message in summary.error_examples:
        click.echo(f"  error: {message}" if name in message else f"  error: {name}: {message}")
    if summary.errors > len(summary.error_examples):
        click.echo(f"  ... and {summary.errors - len(summary.error_examples)} more (column error)")
    click.echo(
        f"{dest}: {summary.inputs} inputs, {summary.encoded} encoded, {summary.errors} errors, "
        f"{summary.skipped} skipped (done before), {summary.seconds:.1f} s, "
        f"{summary.images_per_s:.0f} images/s"
        + (f" ({', '.join(sorted(summary.providers))})" if summary.providers else "")
    )


# --- aegan index / aegan similar -----------------------------------------------------------


@main.command("index")
@click.argument("dest", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--model",
    default=None,
    help="Bundle directory, or bentoml:NAME[:VERSION], that encoded DEST (default: the shipped "
    "model).",
)
@click.option(
    "--kind",
    type=click.Choice(["auto", "exact", "approximate"]),
    default="auto",
    show_default=True,
    help="Exact search (numpy), an approximate inverted-file index (faiss), or exact up to 200 000 "
    "latents and approximate above.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads that build the approximate index (default: the available CPUs).",
)
@needs_extras
def index_command(dest: Path, model: str | None, kind: str, threads: int | None) -> None:
    """Make the `aegan encode` output DEST searchable: a gallery for `aegan similar` and the
    service's /similar (AEGAN_GALLERY=DEST).

    Reads every Parquet part (inputs that failed to encode are left out), refuses an output
    encoded by another bundle than --model, and writes the index and _index.json beside the
    parts, replacing an earlier one whole.
    """
    from aegan_batch.index import build_gallery
    from aegan_core.bundle import DEFAULT_MODEL_DIR, load_bundle, resolve_bundle_dir
    from aegan_core.runtime import available_cpus

    bundle = load_bundle(resolve_bundle_dir(model or DEFAULT_MODEL_DIR))
    summary = build_gallery(
        dest,
        bundle,
        kind=kind,  # type: ignore[arg-type]
        threads=threads or available_cpus(),
        log=click.echo,
    )
    recall = (
        f", recall@10 {summary.recall_at_10:.3f} against exact search ({summary.nprobe} lists "
        "searched a query)"
        if summary.recall_at_10 is not None
        else ""
    )
    click.echo(
        f"{dest}: {summary.kind} gallery of {summary.size} latents{recall}; index built in "
        f"{summary.seconds:.1f} s ({summary.total_seconds:.1f} s in all)"
    )


@main.command("similar")
@click.argument("queries", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--gallery",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="An `aegan encode` output indexed by `aegan index`.",
)
@click.option(
    "--k", type=click.IntRange(1, 100), default=10, show_default=True, help="Neighbours per query."
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Parquet file to write."
)
@click.option(
    "--model",
    default=None,
    help="Bundle that encodes QUERIES images (default: the shipped model); it must be the "
    "gallery's.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Encoding workers or Ray actors."
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--ray", "use_ray", is_flag=True, help="Encode QUERIES on Ray Data.")
@click.option("--ray-address", default=None, metavar="ADDR", help="Ray cluster; implies --ray.")
@needs_extras
def similar_command(
    queries: Path,
    gallery: Path,
    k: int,
    out: Path,
    model: str | None,
    workers: int | None,
    device: str,
    use_ray: bool,
    ray_address: str | None,
) -> None:
    """The K nearest gallery images of each query, written to one Parquet file (columns id,
    neighbours, distances, error).

    QUERIES is an `aegan encode` output (its latents are used as they are) or anything `aegan
    encode` takes (a folder of images, a list of paths, an .npy array), encoded first with the
    gallery's bundle, locally or on Ray Data (--ray).
    """
    from aegan_batch.similar import run_similar

    if use_ray or ray_address is not None:
        import ray.data  # noqa: F401  (before any work: the 'ray' extra may be missing)
    summary = run_similar(
        queries,
        gallery,
        out,
        k=k,
        model=model,
        workers=workers,
        device=device,
        ray=use_ray or ray_address is not None,
        ray_address=ray_address,
    )
    click.echo(
        f"{out}: {summary.queries} queries, {summary.searched} searched, {summary.errors} "
        f"errors (column error), {summary.seconds:.1f} s"
    )
