"""The OpenAPI document says what the service does (in-process): each place where the two once
disagreed, checked from both sides, the document and the answer."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import jsonschema
import pytest
from service_helpers import error_of, serve

from aegan_serve.apikeys import create_key
from aegan_serve.middleware import RETRY_AFTER_S


def body_schema(spec: dict, route: str) -> dict:
    (media,) = spec["paths"][route]["post"]["requestBody"]["content"].values()
    return media["schema"]


@pytest.fixture()
def spec(client) -> dict:
    # fetched for each test (not once a module), so that each test is one that reads the document
    return client.get("/docs.json").json()


@pytest.mark.parametrize("route", ["/decode", "/encode", "/reconstruct", "/interpolate"])
def test_a_body_is_required_where_a_request_without_one_is_refused(client, spec, route):
    assert spec["paths"][route]["post"]["requestBody"]["required"] is True
    assert client.post(route).status_code == 400


@pytest.mark.parametrize("route", ["/sample", "/generate", "/info"])
def test_a_body_is_optional_where_none_is_needed(client, spec, route):
    assert not spec["paths"][route]["post"]["requestBody"].get("required")
    assert client.post(route).status_code == 200


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/sample", {"truncation": False}, "truncation"),
        ("/generate", {"truncation": True}, "truncation"),
        ("/generate", {"truncation": "0.5"}, "truncation"),
        ("/generate", {"n": True}, "n"),
        ("/generate", {"n": "2"}, "n"),
        ("/generate", {"seed": False}, "seed"),
        ("/decode", {"latents": [[True] * 32]}, "latents"),
        ("/interpolate", {"seeds": [1, 2], "steps": True}, "steps"),
        ("/interpolate", {"seeds": [1, 2], "frame_ms": "100"}, "frame_ms"),
    ],
)
def test_numbers_are_json_numbers(client, spec, route, body, field):
    """What the document refuses, the service refuses: a boolean or a string is not a number."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, body_schema(spec, route))
    assert error_of(client.post(route, json=body), 400).startswith(field)


def test_null_is_declared_where_it_is_taken(client, spec):
    for route, field in (("/sample", "seed"), ("/generate", "seed"), ("/interpolate", "latents")):
        assert body_schema(spec, route)["properties"][field]["nullable"] is True
    assert client.post("/generate", json={"n": 1, "seed": None}).status_code == 200
    # a field without a null default does not take null
    assert "nullable" not in body_schema(spec, "/generate")["properties"]["n"]
    assert client.post("/generate", json={"n": None}).status_code == 400
    answer = client.post("/interpolate", json={"seeds": [1, 2], "latents": None, "steps": 2})
    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"seeds": [1, 2]}, True),
        ({"latents": [[0.0] * 32] * 2}, True),
        ({"seeds": [1, 2], "latents": None}, True),
        ({"seeds": [1, 2], "latents": [[0.0] * 32] * 2}, False),
        ({}, False),
        ({"latents": None}, False),
    ],
)
def test_interpolate_takes_exactly_one_pair_of_ends(client, spec, body, valid):
    schema = body_schema(spec, "/interpolate")
    assert [sorted(branch["required"]) for branch in schema["oneOf"]] == [
        ["images"],
        ["seeds"],
        ["latents"],
    ]
    assert schema["properties"]["images"]["minItems"] == 2
    openapi30 = copy.deepcopy(schema)  # `nullable` is OpenAPI 3.0's spelling of "or null"
    for prop in openapi30["properties"].values():
        if prop.pop("nullable", False):
            prop.pop("type", None)
    by_document = jsonschema.Draft4Validator(openapi30).is_valid(body)
    assert by_document == valid
    assert (client.post("/interpolate", json={**body, "steps": 2}).status_code == 200) == valid


def test_the_error_answers_of_the_routes(spec):
    """Keys off: no security, and the answers each kind of route may give, described."""
    encode = spec["paths"]["/encode"]["post"]["responses"]
    assert encode["415"]["description"] == "an uploaded image format that is not accepted"
    assert encode["422"]["description"] == "an image endpoint called on a vector model"
    assert encode["429"]["description"] == "the server is busy; retry after Retry-After"
    assert "422" not in spec["paths"]["/info"]["post"]["responses"]  # no image work
    assert "security" not in spec["paths"]["/metrics"]["get"]


def test_keys_and_quotas_are_in_the_document_when_on(image_bundle: Path, tmp_path, spec):
    assert "securitySchemes" not in spec.get("components", {})
    keys = tmp_path / "keys.json"
    key = create_key(keys, "a", ["generate"])
    env = {
        "AEGAN_API_KEYS_FILE": str(keys),
        "AEGAN_QUOTA_REQUESTS_PER_S": "5",
        "AEGAN_RATE_LIMIT_FAILURE": "closed",
    }
    with serve(image_bundle, **env) as client:
        keyed = client.get("/docs.json").json()
        schemes = keyed["components"]["securitySchemes"]
        assert schemes == {
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        # the key in the header the document names is taken
        by_header = client.post(
            "/generate", json={"n": 1}, headers={schemes["apiKey"]["name"]: key}
        )
        assert by_header.status_code == 200, by_header.text
        no_key = client.post("/generate", json={"n": 1})
        assert no_key.status_code == 401 and "www-authenticate" in no_key.headers
    operation = keyed["paths"]["/generate"]["post"]
    assert operation["security"] == [{"bearer": []}, {"apiKey": []}]
    assert {"401", "403", "429", "503"} <= set(operation["responses"])
    assert {"RateLimit", "RateLimit-Policy"} <= set(operation["responses"]["200"]["headers"])
    assert "Retry-After" in operation["responses"]["503"]["headers"]
    assert operation["responses"]["401"]["headers"] == {
        "WWW-Authenticate": {"schema": {"type": "string"}}
    }
    assert {"RateLimit", "RateLimit-Policy"} <= set(operation["responses"]["429"]["headers"])
    described = {status: answer["description"] for status, answer in operation["responses"].items()}
    assert described["401"] == "no API key, or one that is not valid"
    assert described["403"] == "the API key lacks the scope of this endpoint"
    assert described["503"] == "the quota store cannot be reached; retry after"
    metrics = keyed["paths"]["/metrics"]["get"]
    assert metrics["security"] == [{"bearer": []}, {"apiKey": []}]
    assert set(metrics["responses"]["429"]["headers"]) == {"Retry-After"}
    assert {s: metrics["responses"][s]["description"] for s in ("401", "403", "429")} == {
        "401": "no valid API key",
        "403": "the API key lacks the admin scope",
        "429": "too many wrong keys from this address",
    }
    assert "security" not in keyed["paths"]["/livez"]["get"]


def test_every_answer_in_the_document_has_a_description(spec):
    """OpenAPI requires a description of each response; the error answers the service adds say
    when they are given."""
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation.get("responses", {}).items():
                assert answer.get("description"), (path, method, status)
    responses = spec["paths"]["/encode"]["post"]["responses"]
    assert responses["413"]["description"] == "a request body or an upload over its limit"


def test_the_error_answers_the_service_adds_are_described_as_they_are_sent(client, spec):
    """A 413 of the guard, read as the document says: JSON, of the schema it names."""
    responses = spec["paths"]["/decode"]["post"]["responses"]
    ((media_type, media),) = responses["413"]["content"].items()
    assert media_type == "application/json"
    answer = client.post(
        "/decode", content=b" " * ((1 << 20) + 1), headers={"content-type": media_type}
    )
    assert answer.status_code == 413
    assert answer.headers["content-type"] == media_type
    schema = {**media["schema"], "components": spec["components"]}  # "$ref" read in the document
    jsonschema.validate(answer.json(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"error": 413}, schema)  # the schema it names is not an empty one


def _latents_schemas(node):
    """Each schema of a list of latents in the document, where it is one of several included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "latents" and "items" in value:
                yield value
            for alternative in value.get("anyOf", []) if key == "latents" else []:
                if "items" in alternative:
                    yield alternative
            yield from _latents_schemas(value)
    elif isinstance(node, list):
        for item in node:
            yield from _latents_schemas(item)


def test_the_document_gives_each_latent_its_length(client, spec):
    """Taken and given: /decode, /interpolate, /similar take latents, /encode, /generate and
    /reconstruct give them; each is a list of latent_dim numbers (32 here), in the paths and in
    the components."""
    schemas = list(_latents_schemas(spec["paths"])) + list(_latents_schemas(spec["components"]))
    assert len(schemas) == 12
    for schema in schemas:
        assert schema["items"]["minItems"] == schema["items"]["maxItems"] == 32, schema
    decode = body_schema(spec, "/decode")
    short = {"latents": [[0.5] * 31]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(short, decode)
    assert "this model's latent_dim is 32" in error_of(client.post("/decode", json=short), 400)
    jsonschema.validate({"latents": [[0.5] * 32]}, decode)


def test_retry_after_is_described_as_the_service_sends_it(spec):
    header = spec["paths"]["/generate"]["post"]["responses"]["429"]["headers"]["Retry-After"]
    assert header["description"] == "seconds to wait before trying again"
    jsonschema.validate(int(RETRY_AFTER_S), header["schema"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("soon", header["schema"])


def test_only_the_answers_that_send_retry_after_declare_it(client, spec):
    responses = spec["paths"]["/generate"]["post"]["responses"]
    assert "Retry-After" in responses["429"]["headers"]
    assert "Retry-After" not in responses["413"].get("headers", {})
    too_big = client.post(
        "/generate", content=b" " * (2 << 20), headers={"Content-Type": "application/json"}
    )
    assert too_big.status_code == 413 and "retry-after" not in too_big.headers


def test_the_error_schemas_describe_the_detail_of_a_validation_error(client, spec):
    """A field out of bounds is answered 400 with the error and its detail (a list of the
    fields); the document's error schemas declare that detail."""
    schemas = spec["components"]["schemas"]
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        assert schemas[name]["properties"]["detail"]["anyOf"] == [
            {"type": "string"},
            {"type": "array", "items": {"type": "object"}},
        ], name
    schema = {"$ref": "#/components/schemas/InvalidArgument", "components": spec["components"]}
    answer = client.post("/generate", json={"n": 100_000})
    assert isinstance(answer.json()["detail"], list) and answer.status_code == 400
    jsonschema.validate(answer.json(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"error": "x", "detail": 5}, schema)


def run_asgi(app, path: str, body: bytes = b"") -> list[dict]:
    """The messages ``app`` sends for ``GET path`` with ``body``, as they are sent."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    asyncio.run(app(scope, receive, send))
    return sent


def pieces_app(status: int, body: bytes, headers: list | None):
    """An app answering ``body`` in pieces: one without a ``body`` key, the last one bare."""

    async def app(scope, receive, send):
        start = {"type": "http.response.start", "status": status}
        if headers is not None:
            start["headers"] = headers
        await send(start)
        await send({"type": "http.response.body", "body": body[:7], "more_body": True})
        await send({"type": "http.response.body", "more_body": True})
        await send({"type": "http.response.body", "body": body[7:], "more_body": True})
        await send({"type": "http.response.body"})

    return app


def test_the_document_sent_in_pieces_is_completed_whole_and_its_headers_kept():
    from aegan_serve.openapi import OpenAPICompletion, complete_spec

    raw = {"openapi": "3.0.2", "paths": {}, "components": {"schemas": {}}}
    routes = {"api_routes": [], "upload_routes": [], "image_routes": []}
    describe = dict(latent_dim=4, **routes)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"3"), (b"x-a", b"b")]
    app = OpenAPICompletion(
        pieces_app(200, json.dumps(raw).encode(), headers),
        path="/docs.json",
        describe=lambda: describe,
    )
    start, body = run_asgi(app, "/docs.json")
    expected = json.dumps(complete_spec(copy.deepcopy(raw), **describe)).encode()
    assert body == {"type": "http.response.body", "body": expected}
    assert start == {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"application/json"),
            (b"x-a", b"b"),
            (b"content-length", str(len(expected)).encode()),
        ],
    }

    # an error answer passes whole, unchanged, even from a start message without headers
    app = OpenAPICompletion(
        pieces_app(404, b"not found here", None), path="/docs.json", describe=dict
    )
    start, body = run_asgi(app, "/docs.json")
    assert start["headers"] == [(b"content-length", b"14")]
    assert body["body"] == b"not found here"


def test_the_app_behind_the_document_reads_the_request_as_sent():
    from aegan_serve.openapi import OpenAPICompletion

    async def echo(scope, receive, send):  # as an app that reads its request (or waits on it)
        request = await receive()
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"read: " + request["body"]})

    app = OpenAPICompletion(echo, path="/docs.json", describe=dict)
    sent = run_asgi(app, "/docs.json", b"the request")
    assert sent[-1] == {"type": "http.response.body", "body": b"read: the request"}
