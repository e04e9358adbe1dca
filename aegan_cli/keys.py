"""``aegan keys``: the API keys file of the service (create, list, revoke)."""

from __future__ import annotations

from pathlib import Path

import click

from .base import main

# --- aegan keys -----------------------------------------------------------------------------

KEYS_FILE_OPTION = click.option(
    "--file",
    "keys_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="AEGAN_API_KEYS_FILE",
    required=True,
    help="The keys file the service reads (default: $AEGAN_API_KEYS_FILE).",
)


@main.group("keys")
def keys_group() -> None:
    """API keys of the service: create, list, revoke (only their hashes are stored)."""


@keys_group.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    default=("generate",),
    show_default=True,
    help="A scope of the key, repeatable: generate, encode, search or admin (all).",
)
@KEYS_FILE_OPTION
def keys_create(name: str, scopes: tuple[str, ...], keys_file: Path) -> None:
    """Add a key NAME; prints the key, the only time it is shown."""
    from aegan_serve.apikeys import create_key

    key = create_key(keys_file, name, scopes)
    click.echo(key)
    click.echo(
        f"key {name!r} ({', '.join(sorted(set(scopes)))}) added to {keys_file}; it is shown only "
        "this once: keep it now",
        err=True,
    )


@keys_group.command("list")
@KEYS_FILE_OPTION
def keys_list(keys_file: Path) -> None:
    """The keys of the file: name, scopes, creation time (never a key)."""
    from aegan_serve.apikeys import read_keys

    keys = read_keys(keys_file)
    for key in keys:
        click.echo(f"{key.name}\t{','.join(sorted(key.scopes))}\t{key.created}")


@keys_group.command("revoke")
@click.argument("name")
@KEYS_FILE_OPTION
def keys_revoke(name: str, keys_file: Path) -> None:
    """Remove the key NAME; the service refuses it as soon as it sees the file change."""
    from aegan_serve.apikeys import revoke_key

    revoke_key(keys_file, name)
    click.echo(f"key {name!r} revoked in {keys_file}", err=True)
