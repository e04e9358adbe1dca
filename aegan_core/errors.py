"""The user-error base, and the client errors of the service, each with its HTTP status.

:class:`UserError` is what every stage raises for a problem with the user's input, files or
settings (a bad bundle, a malformed setting, data that cannot be read): not a bug, so the ``aegan``
command prints its message as one line, and ``bentoml serve`` exits with it at start-up.

Helpers raise the client errors directly so that every bad input becomes a 4xx with a message that
says what was wrong; anything else escaping an endpoint is a server bug (5xx). This module imports
no web framework, so the pixel code that raises them is shared with training and batch jobs: the
service turns them into BentoML's answers at the endpoint (``aegan_serve.answers``) and the
request guard answers them itself.
"""

from __future__ import annotations

from http import HTTPStatus


class UserError(Exception):
    """A problem with what the user gave (input, files, settings), described by the message.

    ``usage`` marks a problem with the command line itself (a flag or ``--set`` value): the CLI
    shows it with the usage line and exit status 2, others with exit status 1."""

    usage = False


class ClientError(UserError):
    """A request the server refuses; ``error_code`` is the status of the answer."""

    error_code = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(ClientError):
    """400: the request is malformed (corrupt image, wrong latent length, NaN, ...)."""


class LimitExceeded(RequestError):
    """413: an upload is larger than a configured limit (bytes or pixels)."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedImage(RequestError):
    """415: the upload is an image format the service does not accept."""

    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class WrongModelKind(RequestError):
    """422: the endpoint needs an image model but the loaded model makes vectors."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class Overloaded(ClientError):
    """429: the server is busy (a queue is full or waited too long); retry after ``Retry-After``.

    429 rather than 503 because BentoML hides the message of 5xx answers, and its own concurrency
    limit (``traffic.max_concurrency``) answers 429 as well.
    """

    error_code = HTTPStatus.TOO_MANY_REQUESTS
