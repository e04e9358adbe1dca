"""Completes the OpenAPI document BentoML generates, so that it describes what the service really
accepts and answers (``/docs.json``, and the page at ``/`` that reads it).

BentoML 1.4 declares only 400, 404 and 500 answers, with ``detail`` a string, and cannot know the
length of a latent vector, which comes from the bundle. Added here, as the service behaves:

- every error answer: ``{"error": message}``, with ``detail`` a string or, for a field that failed
  validation, pydantic's list of problems;
- 413 (a body or upload over its limit) and 429 with ``Retry-After`` (load shed) on every
  endpoint; 415 (image format not accepted) where images are uploaded; 422 (an image endpoint on a
  vector model) on the image endpoints;
- every latent vector, in and out, has exactly ``latent_dim`` numbers (from the bundle in use);
- a request body is required where a request without one is refused; a field whose default is
  null takes null (``nullable``); ``/interpolate`` takes exactly one pair of end points
  (``oneOf``: two images, two seeds or two latents);
- with API keys on: the two ways to send a key (``securitySchemes``), 401 and 403; with quotas on:
  the ``RateLimit`` and ``RateLimit-Policy`` headers, and 503 when a closed quota store is down.

What the document cannot say: that an upload's bytes are an image (any bytes are a valid
``format: binary``); such a request is answered 400 or 415.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

ERROR_SCHEMAS = ("InvalidArgument", "NotFound", "InternalServerError")
DETAIL = {
    "title": "Error Detail",
    "description": "more about the error: text, or the list of fields that failed validation",
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
}


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InvalidArgument"}}
        },
    }
    if retry_after:
        answer["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before trying again",
                "schema": {"type": "integer"},
            }
        }
    return answer


def _bound_latents(node: Any, latent_dim: int) -> None:
    """Give every list of latent vectors (a property ``latents``) inner lists of ``latent_dim``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "latents" and isinstance(value, dict):
                for schema in [value, *value.get("anyOf", [])]:
                    inner = schema.get("items")  # only an array has items
                    if isinstance(inner, dict) and inner.get("type") == "array":
                        inner["minItems"] = inner["maxItems"] = latent_dim
            _bound_latents(value, latent_dim)
    elif isinstance(node, list):
        for item in node:
            _bound_latents(item, latent_dim)


RATELIMIT_HEADERS = {
    "RateLimit": {
        "description": "what is left of each budget: r (units left), t (seconds to its reset)",
        "schema": {"type": "string"},
    },
    "RateLimit-Policy": {
        "description": "each budget of the caller: q (units) per w (seconds)",
        "schema": {"type": "string"},
    },
}
INTERPOLATE_ENDS = ("images", "seeds", "latents")  # exactly one of them


def _request_schemas(operation: dict[str, Any]) -> list[dict[str, Any]]:
    content = operation.get("requestBody", {}).get("content", {})
    return [media["schema"] for media in content.values() if isinstance(media.get("schema"), dict)]


def _declare_nulls(schema: dict[str, Any]) -> None:
    """A property whose default is null takes null."""
    for prop in schema.get("properties", {}).values():
        if isinstance(prop, dict) and "default" in prop and prop["default"] is None:
            prop["nullable"] = True


def _one_pair_of_ends(schema: dict[str, Any]) -> None:
    """/interpolate: two images, two seeds or two latents, exactly one of them (a null or an empty
    list of images is not given)."""
    properties = schema.get("properties", {})
    if "images" in properties:
        properties["images"]["minItems"] = 2
    schema["oneOf"] = [
        {"required": [name], "properties": {name: {"type": "array"}}}
        for name in INTERPOLATE_ENDS
        if name in properties
    ]


def complete_spec(
    spec: dict[str, Any],
    *,
    latent_dim: int,
    api_routes: Collection[str],
    upload_routes: Collection[str],
    image_routes: Collection[str],
    keys: bool = False,
    quotas: bool = False,
    closed_quota_store: bool = False,
    metrics_public: bool = False,
) -> dict[str, Any]:
    """``spec`` (BentoML's document, as a dict) completed in place; also returned."""
    schemas = spec.get("components", {}).get("schemas", {})
    if keys:
        spec.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    for name in ERROR_SCHEMAS:
        if name in schemas:
            schemas[name].setdefault("properties", {})["detail"] = dict(DETAIL)
    for route in api_routes:
        for operation in spec.get("paths", {}).get(route, {}).values():
            responses = operation.setdefault("responses", {})
            responses["413"] = _error("a request body or an upload over its limit")
            responses["429"] = _error("the server is busy; retry after Retry-After", True)
            if route in upload_routes:
                responses["415"] = _error("an uploaded image format that is not accepted")
            if route in image_routes:
                responses["422"] = _error("an image endpoint called on a vector model")
            if keys:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
                responses["401"] = _error("no API key, or one that is not valid")
                responses["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
                responses["403"] = _error("the API key lacks the scope of this endpoint")
            if quotas:
                for status in ("200", "429"):
                    if status in responses:
                        responses[status].setdefault("headers", {}).update(RATELIMIT_HEADERS)
            if closed_quota_store:
                responses["503"] = _error("the quota store cannot be reached; retry after", True)
            for schema in _request_schemas(operation):
                _declare_nulls(schema)
                if route == "/interpolate":
                    _one_pair_of_ends(schema)
                if schema.get("required") or schema.get("oneOf"):
                    operation["requestBody"]["required"] = True
    if keys and not metrics_public:
        for operation in spec.get("paths", {}).get("/metrics", {}).values():
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            operation.setdefault("responses", {})["401"] = _error("no valid API key")
            operation["responses"]["403"] = _error("the API key lacks the admin scope")
            operation["responses"]["429"] = _error("too many wrong keys from this address", True)
    _bound_latents(spec.get("paths", {}), latent_dim)
    _bound_latents(schemas, latent_dim)
    return spec


class OpenAPICompletion:
    """ASGI middleware: answers ``GET /docs.json`` with the completed document. ``describe``
    gives the keyword arguments of :func:`complete_spec` at request time (the bundle in use)."""

    def __init__(self, app: Any, *, path: str, describe: Any) -> None:
        self.app = app
        self.path = path
        self.describe = describe

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def completing_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                body = json.dumps(complete_spec(json.loads(body), **self.describe())).encode()
            headers = [
                (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
            ]
            await send({**start, "headers": [*headers, (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, completing_send)
