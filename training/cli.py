"""The ``aegan`` command: ``aegan train``, ``aegan export``, ``aegan directions``, ``aegan eval``.

Flags are turned into a typed :class:`~training.config.RunConfig` here, at the edge, and checked
once by :func:`~training.config.validate`; errors name the flag to fix.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from training.config import DEFAULT_PRESET, PRESETS, ConfigError, RunConfig, from_preset, validate


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler()])


def _parse_set(cfg: RunConfig, assignment: str) -> None:
    """Apply ``section.field=value`` (value parsed as JSON when it can be)."""
    key, sep, raw = assignment.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not hasattr(cfg, section) or not hasattr(getattr(cfg, section), name):
        raise ConfigError("--set", f"{assignment!r} is not SECTION.FIELD=VALUE of a known field")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    setattr(getattr(cfg, section), name, value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train, export and evaluate autoencoding GANs (AEGAN)."""


@main.command()
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=None,
    help=f"Named starting config (default {DEFAULT_PRESET}).",
)
@click.option(
    "--data", "source", default=None, help="'fashion-mnist', a folder of images, or an .npy file."
)
@click.option(
    "--mode",
    type=click.Choice(["aegan", "gan"]),
    default=None,
    help="aegan (G, E, Dx, Dz) or the plain-GAN baseline.",
)
@click.option("--arch", type=click.Choice(["conv", "mlp"]), default=None, help="Network family.")
@click.option("--steps", type=int, default=None, help="Optimiser steps.")
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
    "--set",
    "assignments",
    multiple=True,
    metavar="SECTION.FIELD=VALUE",
    help="Set any config field, e.g. --set loss.recon_x=2 (repeatable).",
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
def train(
    preset: str | None,
    source: str | None,
    mode: str | None,
    arch: str | None,
    steps: int | None,
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
    assignments: tuple[str, ...],
    out: Path | None,
    resume: Path | None,
    no_progress: bool,
    dry_run: bool,
) -> None:
    """Train an AEGAN (or the GAN baseline); writes grids, metrics.jsonl and checkpoints."""
    _setup_logging()
    from training.evaluate import eval_hook_for_run, make_eval_hook
    from training.training_loop import train as run_training

    if resume is not None:
        if dry_run:
            from training.checkpoint import resume_point

            _, raw_config = resume_point(resume)
            click.echo(json.dumps(raw_config, indent=2))
            return
        run_training(None, resume, resume=True, steps=steps, eval_hook=eval_hook_for_run(resume))
        return
    try:
        cfg = from_preset(preset or DEFAULT_PRESET)
        overrides = {
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
            ("train", "batch_size"): batch_size,
            ("train", "seed"): seed,
            ("train", "threads"): threads,
        }
        for (section, name), value in overrides.items():
            if value is not None:
                setattr(getattr(cfg, section), name, value)
        if no_progress:
            cfg.train.progress = False
        for assignment in assignments:
            _parse_set(cfg, assignment)
        validate(cfg)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    out = out or Path("runs") / f"{cfg.preset}-{cfg.loss.mode}-seed{cfg.train.seed}"
    if dry_run:
        click.echo(json.dumps({"run_dir": str(out), **cfg.to_dict()}, indent=2))
        return
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise click.UsageError(f"--out: {out} already holds checkpoints; use --resume {out}")
    path = run_training(cfg, out, eval_hook=make_eval_hook(cfg))
    if path is not None:
        click.echo(f"final checkpoint: {path}")


from training.evaluate import eval_command  # noqa: E402

main.add_command(eval_command)


from export.cli import directions_command, export_command  # noqa: E402

main.add_command(export_command)
main.add_command(directions_command)


def run() -> None:
    """Entry point with friendly errors for the data and checkpoint problems users can fix."""
    from training.checkpoint import CheckpointError
    from training.data import DataError

    try:
        main(standalone_mode=True)
    except (DataError, CheckpointError, ConfigError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
