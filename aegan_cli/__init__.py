"""The ``aegan`` command: train, export, directions, eval, classifier, encode, index, similar
and keys.

This package sits on top of the others and imports each stage inside its command, so
``aegan --help`` loads neither torch nor BentoML, and an install without the ``train`` extra gets a
message naming the extra instead of a traceback. Flags are turned into a typed
:class:`~training.config.RunConfig` at the edge (aegan_cli/training.py);
:func:`~training.config.validate` checks it once and names the flag to fix. The group and its
error handling: aegan_cli/base.py.
"""

from __future__ import annotations

from . import batch, keys, training  # noqa: F401  (each registers its commands on the group)
from .base import main

__all__ = ["main", "run"]


def run() -> None:
    """Entry point of the ``aegan`` console script."""
    main()
