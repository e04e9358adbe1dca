"""One log line per refused request (4xx): method, path, status, reason, key name, client address.

BentoML logs every exception it answers with a full traceback at ERROR (``log_exception``, logger
``bentoml._internal.server.http_app``), a 400 for a missing field as loudly as a bug, and its access
log writes another line for it. Under hostile traffic that is log volume and CPU, and it hides the
real errors. So:

- :class:`ClientErrorFilter` drops BentoML's traceback of an answer below 500 (the exceptions that
  carry a 4xx status, and validation errors); a 5xx keeps its traceback;
- :class:`AccessLineFilter` drops BentoML's access-log line of a 4xx answer, which
  :func:`log_refused` replaces with one line that also says why and who.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("bentoml.aegan_serve.requests")
MAX_FIELD_CHARS = 300  # a path or reason is cut there in the log line
HTTP_APP_LOGGER = "bentoml._internal.server.http_app"
ACCESS_LOGGER = "bentoml.access"


def _printable(text: str) -> str:
    """``text`` on one line, cut: no newline or control character from a client reaches the log."""
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + "..."


def log_refused(
    method: str, path: str, status: int, reason: str, key: str | None, client: str
) -> None:
    logger.info(
        "%s %s %d key=%s client=%s: %s",
        method,
        _printable(path),
        status,
        key or "-",
        client,
        _printable(reason),
    )


def is_client_error(exc: BaseException | None) -> bool:
    """Whether BentoML answers ``exc`` with a 4xx."""
    if exc is None:
        return False
    try:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            return True
    except ImportError:  # pragma: no cover
        pass
    code = getattr(exc, "error_code", None)  # BentoML's: an HTTPStatus, which is an int
    return isinstance(code, int) and 400 <= code < 500


class ClientErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc_info = record.exc_info
        if exc_info is True:  # logged with exc_info=True: resolved when the record is handled
            exc_info = sys.exc_info()
        return not (isinstance(exc_info, tuple) and is_client_error(exc_info[1]))


class AccessLineFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # "%s (%s) (%s) %.3fms" % (address, request, response, latency); response: "status=N,..."
        return not (
            isinstance(args, tuple) and len(args) == 4 and str(args[2]).startswith("status=4")
        )


def install_filters() -> None:
    """Attach the filters to BentoML's loggers (once per process)."""
    for name, kind in ((HTTP_APP_LOGGER, ClientErrorFilter), (ACCESS_LOGGER, AccessLineFilter)):
        target = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in target.filters):
            target.addFilter(kind())
