"""Who calls and how much they may use: API keys with scopes, per-caller quotas, and one log line
for each refused request. ASGI middleware in front of the service (outside the request guard), so a
request without a valid key costs a header check and nothing more.

- Keys (``AEGAN_API_KEYS_FILE``, off when unset): ``Authorization: Bearer KEY`` or ``X-API-Key:
  KEY``. No key, a wrong one or a malformed header: 401 with ``WWW-Authenticate: Bearer``; a key
  without the scope of the endpoint: 403. ``/livez``, ``/readyz`` and ``/healthz`` stay open, and
  so do the pages that hold no data (``/``, ``/docs.json``, ``/ui``); ``/metrics`` needs the
  ``admin`` scope unless ``AEGAN_METRICS_PUBLIC=1``. After ``AEGAN_AUTH_FAILURES_PER_MIN`` wrong
  keys in a minute, a client address is answered 429 (with ``Retry-After``) until its count over
  the last minute falls below that again.
- Quotas (aegan_serve/quotas.py): each request to an endpoint spends one from the caller's request
  budget here, and the endpoint spends its images (:func:`spend_images`). The caller is the key's
  name, or the client address when keys are off. Over budget: 429 with ``Retry-After``; every
  answer of an endpoint carries ``RateLimit-Policy`` and ``RateLimit`` (IETF httpapi draft).
- A 4xx answer, from here or from anywhere behind, is logged in one line
  (aegan_serve/requestlog.py).

A key never appears in a log line, a metric or an answer; its name may.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aegan_core.errors import ClientError, RequestError

from .apikeys import MAX_KEY_CHARS, ApiKey, KeyRing, KeysFileError, find_key
from .config import Environment, Settings, SettingsError, read_environment
from .middleware import reject
from .quotas import Budget, Decision, Quotas, QuotaSettings, StorageDown
from .requestlog import install_filters, log_refused

logger = logging.getLogger("bentoml.aegan_serve.auth")

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
# Pages and documents that hold no data (the explorer asks for a key when its calls get a 401).
PUBLIC_PATHS = frozenset({"/", "/docs.json", "/schema.json"})
PUBLIC_PREFIXES = ("/ui", "/static_content/", "/assets/")
METRICS_PATH = "/metrics"
MAX_AUTH_HEADER_BYTES = 1024  # a longer Authorization or X-API-Key header is malformed
MAX_LOGGED_BODY = 4096  # bytes of a 4xx answer read for the reason in its log line
REALM = 'Bearer realm="aegan"'
KEY_CHARS = re.compile(rb"[A-Za-z0-9._~+/-]+=*")  # RFC 6750's b64token


class QuotaExceeded(ClientError):
    """429: the caller has spent its budget; retry after ``Retry-After``."""

    error_code = HTTPStatus.TOO_MANY_REQUESTS


@dataclass(frozen=True)
class AccessSettings:
    """Keys and quotas, read from the environment at start (a bad value stops the server)."""

    keys_file: Path | None  # AEGAN_API_KEYS_FILE: the keys file (`aegan keys create`); unset: off
    metrics_public: bool  # AEGAN_METRICS_PUBLIC: 1 lets /metrics be read without a key
    quotas: QuotaSettings

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, *, workers: int = 1
    ) -> AccessSettings:
        return cls.from_environment(read_environment(environ), workers=workers)

    @classmethod
    def from_environment(cls, env: Environment, *, workers: int) -> AccessSettings:
        keys_file = Path(env.api_keys_file) if env.api_keys_file else None
        if keys_file is not None:
            try:
                KeyRing(keys_file)  # readable and well-formed now, or the server does not start
            except KeysFileError as exc:
                raise SettingsError(f"AEGAN_API_KEYS_FILE: {exc}") from None
        quotas = QuotaSettings.from_environment(env, workers=workers)
        return cls(keys_file, env.metrics_public, quotas)

    @property
    def quotas_on(self) -> bool:
        return self.quotas.requests is not None or self.quotas.images is not None


@dataclass
class Caller:
    """The caller of one request, for the endpoint (its image budget) and the answer's headers."""

    who: str  # what quotas are counted by: "key:NAME" or "address:IP"
    key: ApiKey | None
    quotas: Quotas | None
    decisions: dict[str, Decision] = field(default_factory=dict)

    def headers(self, policy: str) -> list[tuple[bytes, bytes]]:
        if not self.decisions:
            return []
        rate = ", ".join(d.header() for d in self.decisions.values())
        return [(b"ratelimit-policy", policy.encode()), (b"ratelimit", rate.encode())]


CALLER: ContextVar[Caller | None] = ContextVar("aegan_caller", default=None)
IN_FORCE: dict[str, AccessSettings] = {}  # the settings of this worker's gate (for /docs.json)


def access_in_force() -> dict[str, bool]:
    """What the OpenAPI document says of keys and quotas (aegan_serve/openapi.py), as this
    worker's gate applies them."""
    settings = IN_FORCE.get("settings")
    if settings is None:
        return {}
    return {
        "keys": settings.keys_file is not None,
        "quotas": settings.quotas_on,
        "closed_quota_store": settings.quotas_on and settings.quotas.failure == "closed",
        "metrics_public": settings.metrics_public,
    }


async def spend_images(count: int) -> None:
    """Spend ``count`` images from the current caller's image budget; :class:`QuotaExceeded`
    (429) when it does not hold them. Nothing when quotas are off."""
    caller = CALLER.get()
    if caller is None or caller.quotas is None:
        return
    budget = caller.quotas.settings.images
    if budget is None:
        return
    if count > budget.burst:  # never within budget: retrying would not help
        raise RequestError(
            f"this request makes {count} images, more than the {budget.burst} a caller may make "
            f"at once (AEGAN_QUOTA_IMAGES_BURST); ask for fewer"
        )
    try:
        decision = await caller.quotas.spend(budget, caller.who, count)
    except StorageDown:
        return  # the request was admitted a moment ago; its images are not refused for this
    if decision is None:
        return
    caller.decisions[budget.name] = decision
    if not decision.allowed:
        raise QuotaExceeded(
            f"image quota spent: {budget.burst} images per {budget.window_s} s "
            f"({budget.rate:g} per second); {decision.remaining} left, retry after "
            f"{decision.retry_after} s"
        )


class Gate:
    """ASGI middleware: keys, scopes, the request budget, and the one-line log of 4xx answers.

    ``scopes`` maps each API route to the scope it needs (None: any valid key). The settings are
    read from the environment when a worker builds its app.
    """

    def __init__(self, app: Any, *, scopes: Mapping[str, str | None]) -> None:
        self.app = app
        workers = Settings.from_env().workers  # this server's, for the `local` failure mode
        self.settings = settings = AccessSettings.from_env(workers=workers)
        IN_FORCE["settings"] = settings
        self.scopes = dict(scopes)
        self.keyring = (
            KeyRing(settings.keys_file, on_error=logger.error) if settings.keys_file else None
        )
        self.quotas = Quotas(settings.quotas) if settings.quotas_on or self.keyring else None
        self.policy = settings.quotas.policies()
        install_filters()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("-",))[0]
        caller = Caller(f"address:{client}", None, self.quotas)
        send = _logging_send(send, scope, caller, client)
        if scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        try:
            refusal = await self._admit(scope, caller, client)
        except StorageDown as exc:
            return await reject(send, 503, str(exc), [(b"retry-after", b"1")])
        if refusal is not None:
            return await reject(send, *refusal)
        token = CALLER.set(caller)
        try:
            await self.app(scope, receive, self._with_headers(send, caller))
        finally:
            CALLER.reset(token)

    async def _admit(
        self, scope: dict[str, Any], caller: Caller, client: str
    ) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        """None when the request may go on, else (status, message, headers) of the refusal."""
        path = scope["path"]
        route = path in self.scopes
        # CORS preflights (OPTIONS) carry no credentials, and answer no data.
        if (
            self.keyring is not None
            and scope.get("method") != "OPTIONS"
            and not _is_public(path, self.settings.metrics_public)
        ):
            refusal = await self._authenticate(scope, caller, client)
            if refusal is not None:
                return refusal
            assert caller.key is not None
            needed = "admin" if path == METRICS_PATH else self.scopes.get(path)
            if needed is not None and not caller.key.allows(needed):
                return (
                    403,
                    f"the key {caller.key.name!r} has no {needed!r} scope, which {path} needs "
                    f"(it has: {', '.join(sorted(caller.key.scopes))})",
                    [],
                )
        budget = self.settings.quotas.requests
        if route and budget is not None and self.quotas is not None:
            decision = await self.quotas.spend(budget, caller.who)
            if decision is not None:
                caller.decisions[budget.name] = decision
                if not decision.allowed:
                    return (
                        429,
                        f"request quota spent: {budget.burst} requests per {budget.window_s} s "
                        f"({budget.rate:g} per second); retry after {decision.retry_after} s",
                        [
                            (b"retry-after", str(decision.retry_after).encode()),
                            *caller.headers(self.policy),
                        ],
                    )
        return None

    async def _authenticate(
        self, scope: dict[str, Any], caller: Caller, client: str
    ) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        assert self.keyring is not None and self.quotas is not None
        address = f"address:{client}"
        left = await self.quotas.failures_left(address)
        if left is not None and not left.allowed:
            return (
                429,
                f"too many wrong API keys from this address ({self.settings.quotas.auth_failures} "
                f"a minute, AEGAN_AUTH_FAILURES_PER_MIN); retry after {left.retry_after} s",
                [(b"retry-after", str(left.retry_after).encode())],
            )
        presented, problem = _presented_key(scope["headers"])
        if presented is None:
            if problem is None:  # no key at all: not counted as a failed attempt
                return (
                    401,
                    "this server needs an API key: send 'Authorization: Bearer KEY' or "
                    "'X-API-Key: KEY'",
                    [(b"www-authenticate", REALM.encode())],
                )
            await self.quotas.spend_failure(address)
            return (401, problem, [(b"www-authenticate", _challenge("invalid_request"))])
        key = find_key(self.keyring.current(), presented)
        if key is None:
            await self.quotas.spend_failure(address)
            return (
                401,
                "the API key is not valid (unknown or revoked)",
                [(b"www-authenticate", _challenge("invalid_token"))],
            )
        caller.key, caller.who = key, f"key:{key.name}"
        return None

    def _with_headers(self, send: Any, caller: Caller) -> Any:
        """``send`` that adds the RateLimit headers (and the Retry-After of a spent image budget)
        to the answer of an endpoint."""
        if self.quotas is None or not self.policy:
            return send

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = caller.headers(self.policy)
                spent = [d for d in caller.decisions.values() if not d.allowed]
                headers = list(message.get("headers", []))
                if message["status"] == 429 and spent:
                    headers = [(k, v) for k, v in headers if k.lower() != b"retry-after"]
                    retry = max(d.retry_after for d in spent)
                    extra.append((b"retry-after", str(retry).encode()))
                if extra:
                    message = {**message, "headers": headers + extra}
            await send(message)

        return sending


def _is_public(path: str, metrics_public: bool) -> bool:
    if path == METRICS_PATH:
        return metrics_public
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _challenge(error: str) -> bytes:
    return f'{REALM}, error="{error}"'.encode()


def _presented_key(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """(key, None), (None, None) when no key is sent, or (None, problem) when the headers that
    carry it are malformed. The problem never quotes the header's value."""
    found: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"authorization":
            if len(value) > MAX_AUTH_HEADER_BYTES:
                return (
                    None,
                    f"the Authorization header is longer than {MAX_AUTH_HEADER_BYTES} bytes",
                )
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                return None, "the Authorization header must be 'Bearer KEY'"
            found.append(token.strip())
        elif lower == b"x-api-key":
            if len(value) > MAX_AUTH_HEADER_BYTES:
                return None, f"the X-API-Key header is over {MAX_AUTH_HEADER_BYTES} bytes"
            found.append(value.strip())
    if not found:
        return None, None
    if len(set(found)) > 1:
        return None, "the request carries more than one API key"
    token = found[0]
    if len(token) > MAX_KEY_CHARS or not KEY_CHARS.fullmatch(token):
        return None, "the API key is malformed (a key is letters, digits and -._~+/=)"
    return token.decode("ascii"), None


def _logging_send(send: Any, scope: dict[str, Any], caller: Caller, client: str) -> Any:
    """``send`` that logs a 4xx answer (and the 503 of a closed quota store) in one line, with the
    ``error`` of its body as the reason."""
    status = 0
    body = bytearray()

    async def logging_send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and (400 <= status < 500 or status == 503):
            if len(body) < MAX_LOGGED_BODY:
                body.extend(message.get("body", b"")[: MAX_LOGGED_BODY - len(body)])
            if not message.get("more_body", False):
                log_refused(
                    scope["method"],  # an HTTP scope always has one (ASGI)
                    scope["path"],
                    status,
                    _reason(bytes(body)),
                    caller.key.name if caller.key else None,
                    client,
                )
        await send(message)

    return logging_send


def _reason(body: bytes) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
    if isinstance(payload, list) and len(payload) == 1:
        payload = payload[0]
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return payload["error"]
    return body.decode("utf-8", "replace")


__all__ = ["CALLER", "AccessSettings", "Budget", "Gate", "QuotaExceeded", "spend_images"]
