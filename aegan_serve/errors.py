"""Client errors: each carries the HTTP status it is answered with.

Helpers raise these directly so that every bad input becomes a 4xx with a message that says what
was wrong; anything else escaping an endpoint is a server bug (5xx). This module imports no web
framework, so the pixel code that raises them is shared with training: the service turns them into
BentoML's answers at the endpoint (``aegan_serve.service.answers_client_errors``) and the request
guard answers them itself.
"""

from __future__ import annotations

from http import HTTPStatus


class ClientError(Exception):
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
