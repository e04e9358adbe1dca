"""Client errors. BentoML answers each with its HTTP status and ``{"error": message}``.

Helpers raise these directly so that every bad input becomes a 4xx with a message that says what
was wrong; anything else escaping an endpoint is a server bug (5xx).
"""

from __future__ import annotations

from http import HTTPStatus

from bentoml.exceptions import BentoMLException


class RequestError(BentoMLException):
    """400: the request is malformed (corrupt image, wrong latent length, NaN, ...)."""

    error_code = HTTPStatus.BAD_REQUEST


class LimitExceeded(RequestError):
    """413: an upload is larger than a configured limit (bytes or pixels)."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedImage(RequestError):
    """415: the upload is an image format the service does not accept."""

    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class WrongModelKind(RequestError):
    """422: the endpoint needs an image model but the loaded model makes vectors."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class Overloaded(BentoMLException):
    """429: the server is busy (a queue is full or waited too long); retry after ``Retry-After``.

    429 rather than 503 because BentoML hides the message of 5xx answers, and its own concurrency
    limit (``traffic.max_concurrency``) answers 429 as well.
    """

    error_code = HTTPStatus.TOO_MANY_REQUESTS
