"""ASGI middleware in front of the endpoints: request size and form-body checks.

BentoML parses form bodies itself, and some malformed ones would surface as server errors there (a
text value in a file field is taken as a URL to download; a file in a text field is decoded as
JSON; Starlette's own multipart errors are not mapped to 4xx). This guard reads the body as it
streams past, without buffering it, and answers such requests with a 4xx that says what is wrong:

- a form body larger than ``max_bytes`` (``AEGAN_MAX_REQUEST_BYTES``), any other body (JSON)
  larger than ``max_json_bytes`` (``AEGAN_MAX_JSON_BYTES``): 413, before it is read when the
  ``Content-Length`` says so, else as soon as the streamed body passes the limit;
- at most one ``Content-Type`` and one ``Content-Length`` header;
- multipart bodies: a boundary, well-formed parts, named parts, files only in file fields, text
  only elsewhere, text parts of at most 1 MiB and at most 1000 parts (Starlette's limits);
- url-encoded bodies: no file fields (files need multipart; names are percent-decoded first, as
  the form parser will), at most 1000 fields, fields of at most 1 MiB (name and value as sent,
  Starlette's limit);
- text values of forms that BentoML's JSON reading of form values would fail on with a server
  error (numbers of more than 4300 digits, deep nesting).

It also adds ``Retry-After`` to 429 and 503 answers (load shed), and gives every error answer one
shape, ``{"error": message}``: BentoML 1.4 wraps the message of a service exception in a
one-element list, and says only "1 validation error for Input" for a field out of bounds (the field
and the bound are then put in the message; ``detail`` stays).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import unquote_plus

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, QuerystringParser, parse_options_header

from aegan_core.errors import ClientError, LimitExceeded, Overloaded, RequestError

from .answers import bentoml_error

MAX_TEXT_PART_BYTES = 1 << 20  # Starlette's limit for a multipart part that is not a file
MAX_PARTS = 1000  # Starlette's limit on files (and on fields) per multipart body
SINGLE_HEADERS = ("content-type", "content-length")  # a request may carry at most one of each
RETRY_AFTER_S = b"1"  # Retry-After of a 429/503 answer: the queues drain within about a second


class _MultipartCheck:
    """Streaming multipart parser that raises on the first part BentoML would mishandle."""

    name: str  # the current part's field name, set when its headers are finished

    def __init__(self, boundary: bytes, file_fields: Collection[str]) -> None:
        self.file_fields = file_fields
        self.parts = 0
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.text_bytes: int | None = None  # size of the current text part; None in a file part
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )
        self.text = bytearray()

    def feed(self, chunk: bytes, last: bool) -> None:
        try:
            self.parser.write(chunk)
            if last:
                self.parser.finalize()
        except FormParserError as exc:
            raise RequestError(f"malformed multipart/form-data body: {exc}") from None

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise RequestError(f"multipart body has more than {MAX_PARTS} parts")
        self.disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def _header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise RequestError("a multipart part has no name in its Content-Disposition header")
        name = options[b"name"].decode("utf-8", "replace")
        is_file = b"filename" in options
        if name in self.file_fields and not is_file:
            raise RequestError(
                f"form field {name!r} must be an uploaded file (a part with a filename, "
                f"e.g. curl -F '{name}=@picture.png'), not text"
            )
        if name not in self.file_fields and is_file:
            raise RequestError(f"form field {name!r} takes a value, not a file")
        self.name = name
        self.text_bytes = None if is_file else 0
        self.text.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.text_bytes is not None:
            self.text_bytes += end - start
            if self.text_bytes > MAX_TEXT_PART_BYTES:
                raise LimitExceeded(f"a form field is larger than {MAX_TEXT_PART_BYTES} bytes")
            self.text += data[start:end]

    def _part_end(self) -> None:
        if self.text_bytes is not None:
            _check_form_value(self.name, bytes(self.text))


class _UrlencodedCheck:
    """Streaming url-encoded parser that refuses file fields."""

    name: bytes  # the current field's name as sent, set when the field starts

    def __init__(self, file_fields: Collection[str]) -> None:
        self.file_fields = file_fields
        self.value = bytearray()
        self.fields = 0
        self.parser = QuerystringParser(
            {
                "on_field_start": self._start,
                "on_field_name": self._name,
                "on_field_data": self._data,
                "on_field_end": self._end,
            }
        )

    def feed(self, chunk: bytes, last: bool) -> None:
        self.parser.write(chunk)
        if last:
            self.parser.finalize()

    def _start(self) -> None:
        self.fields += 1
        if self.fields > MAX_PARTS:
            raise RequestError(f"url-encoded body has more than {MAX_PARTS} fields")
        self.name = b""
        self.value.clear()

    def _name(self, data: bytes, start: int, end: int) -> None:
        self.name += data[start:end]
        self._check_size()

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]
        self._check_size()

    def _check_size(self) -> None:
        # Starlette's limit, on the name and the value as sent (before percent-decoding); past it
        # Starlette's error would reach BentoML as a server error.
        if len(self.name) + len(self.value) > MAX_TEXT_PART_BYTES:
            raise LimitExceeded(f"a form field is larger than {MAX_TEXT_PART_BYTES} bytes")

    def _end(self) -> None:
        # Decoded as the form parser will decode it: "imag%65s" is the field "images".
        name = unquote_plus(self.name.decode("latin-1"), encoding="utf-8", errors="replace")
        if name in self.file_fields:
            raise RequestError(f"form field {name!r} is a file: send it as multipart/form-data")
        value = unquote_plus(self.value.decode("latin-1"), encoding="utf-8", errors="replace")
        _check_form_value(name, value.encode())


def _check_form_value(name: str, value: bytes) -> None:
    """BentoML reads each text value of a form as JSON when it parses, else as a string; refuse
    the values on which that parse fails other than by not being JSON (a number of more than 4300
    digits, nesting deeper than the interpreter's recursion limit)."""
    try:
        json.loads(value)
    except json.JSONDecodeError:
        pass  # taken as a string, then validated as one
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RequestError(
            f"form field {name!r} has a value that cannot be read: {reason}"
        ) from None


class RequestGuard:
    """Refuse oversized or malformed request bodies with a 4xx before BentoML parses them.

    ``routes`` maps each API route to the names of its file fields; other paths pass untouched.
    """

    def __init__(
        self,
        app: Any,
        *,
        max_bytes: int,
        max_json_bytes: int,
        max_inflight_bytes: int,
        routes: Mapping[str, Collection[str]],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_bytes = max_json_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.inflight_bytes = 0  # request body bytes announced or received, of unfinished requests
        self.routes = {route: frozenset(fields) for route, fields in routes.items()}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.routes:
            return await self.app(scope, receive, send)
        file_fields = self.routes[scope["path"]]
        headers: dict[str, bytes] = {}
        for key, value in scope["headers"]:
            name = key.decode("latin-1").lower()
            if name in headers and name in SINGLE_HEADERS:  # which one would the parser read?
                return await reject(send, 400, f"the request has more than one {name} header")
            headers[name] = value
        media_type, options = parse_options_header(headers.get("content-type"))
        is_form = media_type in (b"multipart/form-data", b"application/x-www-form-urlencoded")
        # Bodies that are not forms are parsed whole (JSON): a limit of their own, far below the
        # one for uploads, keeps the parse small.
        limit, setting = (
            (self.max_bytes, "AEGAN_MAX_REQUEST_BYTES")
            if is_form
            else (min(self.max_bytes, self.max_json_bytes), "AEGAN_MAX_JSON_BYTES")
        )
        too_large = f"request body is larger than {limit} bytes ({setting})"
        length = headers.get("content-length", b"").strip()
        if length.isdigit() and int(length) > limit:
            return await reject(send, 413, too_large)
        # Bodies held at once by this worker: announced ones count from the start, so excess
        # load is refused before any of it is read.
        reserved = int(length) if length.isdigit() else 0
        if self.inflight_bytes + reserved > self.max_inflight_bytes:
            return await reject(send, 429, self._busy(), [(b"retry-after", RETRY_AFTER_S)])
        self.inflight_bytes += reserved
        check: _MultipartCheck | _UrlencodedCheck | None = None
        if media_type == b"multipart/form-data":
            if b"boundary" not in options:
                return await reject(send, 400, "multipart/form-data without a boundary")
            check = _MultipartCheck(options[b"boundary"], file_fields)
        elif media_type == b"application/x-www-form-urlencoded":
            check = _UrlencodedCheck(file_fields)
        received = 0

        async def checked_receive() -> dict[str, Any]:
            # Raised here, inside BentoML's reading of the body, BentoML answers with the error's
            # status.
            try:
                return await check_message(await receive())
            except ClientError as exc:
                raise bentoml_error(exc) from None

        async def check_message(message: dict[str, Any]) -> dict[str, Any]:
            nonlocal received, reserved
            if message["type"] == "http.request":
                body = message.get("body", b"")
                received += len(body)
                if received > limit:
                    raise LimitExceeded(too_large)
                if received > reserved:  # more than announced (or no Content-Length): count it
                    self.inflight_bytes += received - reserved
                    reserved = received
                    if self.inflight_bytes > self.max_inflight_bytes:
                        raise Overloaded(self._busy())
                if check is not None:
                    check.feed(body, last=not message.get("more_body", False))
            return message

        try:
            await self.app(scope, checked_receive, _unwrap_errors(send))
        finally:
            self.inflight_bytes -= reserved

    def _busy(self) -> str:
        return (
            f"the server holds {self.inflight_bytes} bytes of request bodies, the most it takes "
            f"at once is {self.max_inflight_bytes} (AEGAN_MAX_INFLIGHT_BYTES); retry shortly"
        )


async def reject(
    send: Any, status: int, message: str, extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer ``status`` with ``{"error": message}`` (the guard's refusals and the gate's)."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_body(body: bytes) -> bytes:
    """An error body in the one shape ``{"error": message, ...}``."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], dict):
        payload = payload[0]
    if isinstance(payload, dict) and isinstance(payload.get("detail"), list):
        problems = [
            f"{'.'.join(map(str, d.get('loc', ()))) or 'body'}: {d.get('msg', '')}"
            for d in payload["detail"]
            if isinstance(d, dict)
        ]
        if problems:
            payload["error"] = "; ".join(problems)
    return json.dumps(payload).encode()


def _unwrap_errors(send: Any) -> Any:
    """Wrap ``send`` so that error answers go out through :func:`_error_body`."""
    start: dict[str, Any] | None = None
    chunks: list[bytes] = []

    async def unwrapping_send(message: dict[str, Any]) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] >= 400:
            start = message  # hold it: the body decides the content-length
            return
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = _error_body(b"".join(chunks))
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        if start["status"] in (429, 503) and not any(
            k.lower() == b"retry-after" for k, _ in headers
        ):
            headers.append((b"retry-after", RETRY_AFTER_S))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return unwrapping_send
