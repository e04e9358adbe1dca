"""How an endpoint is declared (:func:`endpoint`), and how the framework-free client errors of
:mod:`aegan_core.errors` become BentoML's answers.

BentoML answers an exception of its own type with the status it carries and ``{"error": message}``,
and anything else with a bare 500. The helpers (pixels, latents, batching) raise
:class:`~aegan_core.errors.ClientError` so that training can share them without BentoML; the
endpoints and the request guard convert at this one seam.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import bentoml
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


ImageUse = Literal["never", "always", "when uploaded"]


@dataclass(frozen=True)
class Declared:
    """What :func:`endpoint` declared of an endpoint (``func.declared`` of its BentoML API)."""

    route: str
    scope: str | None  # the scope a key needs (aegan_serve/auth.py); None: any valid key
    images: ImageUse  # whether it works with image models only (422 on a vector model)
    gallery: bool = False  # whether it needs the server's gallery (404 without one, checked first)


def endpoint(
    *,
    scope: str | None,
    images: ImageUse = "never",
    gallery: bool = False,
    route: str | None = None,
) -> Callable[[Callable[..., Any]], Any]:
    """Declare a method of the service an endpoint, in one place: a BentoML API at ``route``
    (``/`` and the method's name by default) needing ``scope``, whose client errors are answered
    with their status; before the method runs, 404 when it needs the ``gallery`` and the server
    has none (``self.app.require_gallery``), then 422 on a vector model when ``images`` is
    ``always``, or ``when uploaded`` and its ``images`` argument holds uploads
    (``self.app.require_images``)."""

    def declare(method: Callable[..., Any]) -> Any:
        declared = Declared(route or f"/{method.__name__}", scope, images, gallery)
        signature = inspect.signature(method)

        def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if declared.gallery:
                args[0].app.require_gallery()
            if declared.images == "never":
                return
            if declared.images == "when uploaded":
                given = signature.bind_partial(*args, **kwargs).arguments
                if not given.get("images"):
                    return
            args[0].app.require_images(declared.route)

        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def checked(*args: Any, **kwargs: Any) -> Any:
                check(args, kwargs)
                return await method(*args, **kwargs)

        else:

            @functools.wraps(method)
            def checked(*args: Any, **kwargs: Any) -> Any:
                check(args, kwargs)
                return method(*args, **kwargs)

        checked.declared = declared  # type: ignore[attr-defined]  # read back through the API
        return bentoml.api(route=route)(answers_client_errors(checked))

    return declare


def declared(func: Callable[..., Any]) -> Declared:
    """What :func:`endpoint` declared of ``func`` (a BentoML API's ``func``)."""
    found = getattr(func, "declared", None)
    if not isinstance(found, Declared):
        raise TypeError(f"{func.__name__} is not declared with @endpoint")
    return found
