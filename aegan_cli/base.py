"""The ``aegan`` click group: the one place user errors become messages, and the extras check."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

# Modules a command may need that a serving-only install (``pip install aegan-serve``) lacks, and
# the extra that brings each.
EXTRAS = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "matplotlib": "train",
    "pyarrow": "batch",
    "ray": "ray",
}


def needs_extras(command: F) -> F:
    """Turn the import error of a missing optional dependency into a message naming its extra."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ModuleNotFoundError as exc:
            top = (exc.name or "").partition(".")[0]
            if top not in EXTRAS:
                raise
            extra = EXTRAS[top]
            name = click.get_current_context().info_name
            raise click.ClickException(
                f"`aegan {name}` needs {top}, which is not installed; install the {extra!r} "
                f"extra: pip install 'aegan-serve[{extra}]'"
            ) from None

    return wrapper  # type: ignore[return-value]


def setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler()])


class _Commands(click.Group):
    """The ``aegan`` group: a :class:`~aegan_core.errors.UserError` raised anywhere in a command
    (a bad bundle, run, data set, setting or flag) is shown as click shows its own errors, one
    line and no traceback: exit status 2 with the usage line for a command-line problem, 1 for
    the others. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from aegan_core.errors import UserError

        try:
            return super().invoke(ctx)
        except UserError as exc:
            if exc.usage:
                raise click.UsageError(str(exc), ctx=click.get_current_context()) from exc
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train, export and evaluate autoencoding GANs (AEGAN)."""
