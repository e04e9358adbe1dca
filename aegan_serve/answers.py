"""How the framework-free client errors of :mod:`aegan_core.errors` become BentoML's answers.

BentoML answers an exception of its own type with the status it carries and ``{"error": message}``,
and anything else with a bare 500. The helpers (pixels, latents, batching) raise
:class:`~aegan_core.errors.ClientError` so that training can share them without BentoML; the
endpoints and the request guard convert at this one seam.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from bentoml.exceptions import BentoMLException

from aegan_core.errors import ClientError

F = TypeVar("F", bound=Callable[..., Any])


def bentoml_error(exc: ClientError) -> BentoMLException:
    """The BentoML exception BentoML answers with ``exc``'s status and message."""
    return BentoMLException(exc.message, error_code=exc.error_code)


def answers_client_errors(endpoint: F) -> F:
    """Wrap an endpoint so that a :class:`ClientError` it raises is answered with its status."""
    if inspect.iscoroutinefunction(endpoint):

        @functools.wraps(endpoint)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await endpoint(*args, **kwargs)
            except ClientError as exc:
                raise bentoml_error(exc) from None

        return wrapper  # type: ignore[return-value]  # same signature (functools.wraps)

    @functools.wraps(endpoint)
    def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        except ClientError as exc:
            raise bentoml_error(exc) from None

    return sync_wrapper  # type: ignore[return-value]  # same signature (functools.wraps)
