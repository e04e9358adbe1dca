"""``python -m aegan_cli``: the ``aegan`` command."""

from aegan_cli import run

run()
