"""API keys: the keys file, the keys in it and how a presented key is checked. Standard library only
(the ``aegan keys`` command and the service share it).

The file (``AEGAN_API_KEYS_FILE``) holds no key, only the SHA-256 of each: a key is 32 random
bytes (256 bits, ``secrets.token_urlsafe``), so a fast hash is enough; there is nothing to guess.
Each entry has a name (shown in logs, never the key), its scopes and when it was made::

    {"version": 1, "keys": [{"name": "alice", "sha256": "9f86…", "scopes": ["generate"],
                             "created": "2026-12-07T11:00:00+00:00"}]}

A presented key is hashed and compared with every stored hash by :func:`hmac.compare_digest`, all of
them, so the time taken says nothing about which stored hash came closest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aegan_core.errors import UserError
from aegan_core.files import write_atomic

FORMAT_VERSION = 1
# What each scope lets a key call; `admin` is every scope and /metrics.
SCOPES = {
    "generate": "/sample, /generate, /decode, /interpolate",
    "encode": "/encode, /reconstruct",
    "search": "/similar, /gallery/image",
    "admin": "every endpoint and /metrics",
}
KEY_PREFIX = "aegan_"  # makes a leaked key easy to recognise (secret scanners, logs)
KEY_BYTES = 32
MAX_KEY_CHARS = 256  # longer presented keys are refused before hashing
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # safe to print in a log line


class KeysFileError(UserError, ValueError):
    """The keys file cannot be read or used; the message names the file and the problem."""


@dataclass(frozen=True)
class ApiKey:
    """One stored key: no secret, its hash."""

    name: str
    sha256: str  # hex digest of the key's UTF-8 bytes
    scopes: frozenset[str]
    created: str  # ISO 8601, UTC

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "scopes": sorted(self.scopes),
            "created": self.created,
        }


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A new random key: ``aegan_`` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def find_key(keys: Iterable[ApiKey], presented: str) -> ApiKey | None:
    """The stored key that ``presented`` is, or None. Compares with every stored hash in constant
    time, without stopping at a match."""
    if not presented or len(presented) > MAX_KEY_CHARS:
        return None
    digest = hash_key(presented).encode()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.sha256.encode()):
            found = key
    return found


def check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    scopes = frozenset(scopes)
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise KeysFileError(f"unknown scope {', '.join(unknown)}; scopes are {', '.join(SCOPES)}")
    if not scopes:
        raise KeysFileError(f"a key needs at least one scope ({', '.join(SCOPES)})")
    return scopes


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise KeysFileError(
            f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def read_keys(path: Path) -> list[ApiKey]:
    """The keys of the file at ``path``; :class:`KeysFileError` naming the problem otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeysFileError(f"cannot read the keys file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"keys file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise KeysFileError(
            f'keys file {path} is not a version {FORMAT_VERSION} keys file ({{"version": '
            f'{FORMAT_VERSION}, "keys": [...]}}); make it with `aegan keys create`'
        )
    entries = data.get("keys")
    if not isinstance(entries, list):
        raise KeysFileError(f'keys file {path}: "keys" must be a list')
    keys: list[ApiKey] = []
    for i, entry in enumerate(entries):
        try:
            if not isinstance(entry, dict):
                raise KeysFileError("not an object")
            name, digest, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
            if not isinstance(name, str):
                raise KeysFileError('"name" must be a string')
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise KeysFileError('"sha256" must be 64 lowercase hex digits (a hash, not a key)')
            if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                raise KeysFileError('"scopes" must be a list of strings')
            key = ApiKey(
                check_name(name), digest, check_scopes(scopes), str(entry.get("created", ""))
            )
        except KeysFileError as exc:
            raise KeysFileError(f"keys file {path}: keys[{i}]: {exc}") from None
        if any(k.name == key.name for k in keys):
            raise KeysFileError(f"keys file {path}: the name {key.name!r} is used twice")
        keys.append(key)
    return keys


def write_keys(path: Path, keys: Iterable[ApiKey]) -> None:
    """Replace the keys file whole (crash-safe), readable by its owner only."""
    body = {"version": FORMAT_VERSION, "keys": [key.to_json() for key in keys]}
    write_atomic(path, (json.dumps(body, indent=1) + "\n").encode())
    os.chmod(path, 0o600)


def create_key(path: Path, name: str, scopes: Iterable[str]) -> str:
    """Add a key named ``name`` to the file (made if missing); returns the key, the one time it is
    ever seen."""
    keys = read_keys(path) if path.exists() else []
    if any(key.name == name for key in keys):
        raise KeysFileError(f"a key named {name!r} exists already in {path}; revoke it first")
    secret = new_key()
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    keys.append(ApiKey(check_name(name), hash_key(secret), check_scopes(scopes), created))
    write_keys(path, keys)
    return secret


def revoke_key(path: Path, name: str) -> None:
    keys = read_keys(path)
    kept = [key for key in keys if key.name != name]
    if len(kept) == len(keys):
        raise KeysFileError(f"no key named {name!r} in {path}")
    write_keys(path, kept)


_NOT_FAILED = object()


class KeyRing:
    """The keys of a file, read again when the file changes (its inode, size or modification time:
    one ``stat`` per call). A file that becomes unreadable or malformed keeps the keys last read
    good and reports the problem once, through ``on_error``."""

    def __init__(self, path: Path, on_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.on_error = on_error
        self.keys = read_keys(path)  # at start: a bad file is an error, not a warning
        self.signature = self._signature()
        # the signature of the file last found bad; _NOT_FAILED (unlike None) is not that of a
        # missing file, so a file removed while the server runs is reported
        self.failed_signature: object = _NOT_FAILED

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> list[ApiKey]:
        signature = self._signature()
        if signature != self.signature and signature != self.failed_signature:
            try:
                self.keys = read_keys(self.path)
                self.signature, self.failed_signature = signature, _NOT_FAILED
            except KeysFileError as exc:
                self.failed_signature = signature
                if self.on_error is not None:
                    self.on_error(f"{exc}; still using the {len(self.keys)} keys read before")
        return self.keys
