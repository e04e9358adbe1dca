"""API keys: the keys file and `aegan keys`, and the service with keys on (in-process): 401, 403,
scopes, open paths, hostile Authorization headers, keys picked up without a restart, wrong keys
rate-limited per address, and no key in any answer or log line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from service_helpers import TestClient, error_of, serve

from aegan_cli import main
from aegan_serve.apikeys import (
    ApiKey,
    KeyRing,
    KeysFileError,
    create_key,
    find_key,
    hash_key,
    read_keys,
    revoke_key,
)
from aegan_serve.auth import AccessSettings
from aegan_serve.config import SettingsError


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "keys.json"
    made = {
        "gen": create_key(path, "gen", ["generate"]),
        "enc": create_key(path, "enc", ["encode"]),
        "root": create_key(path, "root", ["admin"]),
    }
    return path, made


@pytest.fixture
def keyed(image_bundle: Path, keys):
    path, made = keys
    with serve(image_bundle, AEGAN_API_KEYS_FILE=str(path)) as client:
        yield client, path, made


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the keys file -------------------------------------------------------------------------------


def test_the_file_holds_hashes_names_and_scopes_never_a_key(keys):
    path, made = keys
    text = path.read_text()
    for key in made.values():
        assert key.startswith("aegan_") and len(key) >= 40
        assert key not in text and hash_key(key) in text
    assert [(k.name, sorted(k.scopes)) for k in read_keys(path)] == [
        ("gen", ["generate"]),
        ("enc", ["encode"]),
        ("root", ["admin"]),
    ]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert find_key(read_keys(path), made["enc"]).name == "enc"
    assert find_key(read_keys(path), made["enc"] + "x") is None
    assert find_key(read_keys(path), "") is None


def test_an_empty_or_overlong_presented_key_is_never_found():
    stored = [ApiKey(f"k{len(k)}", hash_key(k), frozenset({"admin"}), "") for k in ("", "k" * 256)]
    stored.append(ApiKey("k257", hash_key("k" * 257), frozenset({"admin"}), ""))
    assert find_key(stored, "k" * 256).name == "k256"  # the longest a key may be
    assert find_key(stored, "k" * 257) is None  # refused before hashing, even when stored
    assert find_key(stored, "") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ('{"keys": []}', "is not a version 1 keys file"),
        ('{"version": 1, "keys": {}}', '"keys" must be a list'),
        ('{"version": 1, "keys": [{"name": "a", "sha256": "abc", "scopes": ["generate"]}]}', "64"),
        (
            '{"version": 1, "keys": [{"name": "a", "sha256": "'
            + "0" * 64
            + '", "scopes": ["x"]}]}',
            "unknown scope x",
        ),
        (
            '{"version": 1, "keys": [{"name": "a b", "sha256": "' + "0" * 64 + '", "scopes": []}]}',
            "key name 'a b'",
        ),
    ],
)
def test_a_malformed_keys_file_is_refused_naming_the_problem(tmp_path, content, message):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(KeysFileError, match=message):
        read_keys(path)
    with pytest.raises(SettingsError, match="AEGAN_API_KEYS_FILE"):
        AccessSettings.from_env({"AEGAN_API_KEYS_FILE": str(path)})


HASH = "0" * 64


def _keys_file(*entries: object) -> str:
    return json.dumps({"version": 1, "keys": list(entries)})


NOT_VERSION_1 = (
    ' is not a version 1 keys file ({"version": 1, "keys": [...]}); '
    "make it with `aegan keys create`"
)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("not json", " is not JSON: Expecting value: line 1 column 1 (char 0)"),
        ("[]", NOT_VERSION_1),
        ('{"version": 2, "keys": []}', NOT_VERSION_1),
        ('{"version": 1}', ': "keys" must be a list'),
        (_keys_file("a"), ": keys[0]: not an object"),
        (
            _keys_file({"name": 1, "sha256": HASH, "scopes": ["generate"]}),
            ': keys[0]: "name" must be a string',
        ),
        (
            _keys_file({"name": "a", "sha256": "A" * 64, "scopes": ["generate"]}),
            ': keys[0]: "sha256" must be 64 lowercase hex digits (a hash, not a key)',
        ),
        (
            _keys_file({"name": "a", "sha256": HASH + "0", "scopes": ["generate"]}),
            ': keys[0]: "sha256" must be 64 lowercase hex digits (a hash, not a key)',
        ),
        (
            _keys_file({"name": "a", "sha256": HASH, "scopes": "generate"}),
            ': keys[0]: "scopes" must be a list of strings',
        ),
        (
            _keys_file({"name": "a", "sha256": HASH, "scopes": ["generate", 1]}),
            ': keys[0]: "scopes" must be a list of strings',
        ),
        (
            _keys_file({"name": "a", "sha256": HASH, "scopes": []}),
            ": keys[0]: a key needs at least one scope (generate, encode, search, admin)",
        ),
        (
            _keys_file({"name": "a", "sha256": HASH, "scopes": ["x", "generate", "all"]}),
            ": keys[0]: unknown scope all, x; scopes are generate, encode, search, admin",
        ),
        (
            _keys_file({"name": "a b", "sha256": HASH, "scopes": ["generate"]}),
            ": keys[0]: key name 'a b' must be 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit",
        ),
        (
            _keys_file({"name": "a", "sha256": HASH, "scopes": ["generate"]}, None),
            ": keys[1]: not an object",
        ),
        (
            _keys_file(*[{"name": "a", "sha256": HASH, "scopes": ["generate"]}] * 2),
            ": the name 'a' is used twice",
        ),
    ],
)
def test_each_fault_of_a_keys_file_has_its_whole_message(tmp_path, content, says):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(KeysFileError) as caught:
        read_keys(path)
    assert str(caught.value) == f"keys file {path}{says}"


def test_a_keys_file_is_read_entry_by_entry(tmp_path):
    path = tmp_path / "keys.json"
    made = "2026-12-07T11:00:00+00:00"
    path.write_text(
        _keys_file(
            {"name": "a", "sha256": HASH, "scopes": ["generate", "encode"], "created": made},
            {"name": "b.2", "sha256": "f" * 64, "scopes": ["admin"]},  # no date
        )
    )
    assert read_keys(path) == [
        ApiKey("a", HASH, frozenset({"generate", "encode"}), made),
        ApiKey("b.2", "f" * 64, frozenset({"admin"}), ""),
    ]


def test_a_missing_keys_file_stops_the_server_settings(tmp_path):
    with pytest.raises(KeysFileError) as caught:
        read_keys(tmp_path / "none.json")
    assert str(caught.value) == (
        f"cannot read the keys file {tmp_path / 'none.json'}: No such file or directory"
    )
    with pytest.raises(SettingsError, match="cannot read the keys file"):
        AccessSettings.from_env({"AEGAN_API_KEYS_FILE": str(tmp_path / "none.json")})
    off = AccessSettings.from_env({})
    assert off.keys_file is None  # off by default
    assert off.quotas.workers == 1  # a budget shared by one worker unless told otherwise


def test_aegan_keys_create_list_revoke(tmp_path):
    path = tmp_path / "keys.json"
    runner = CliRunner()
    made = runner.invoke(
        main, ["keys", "create", "alice", "--scope", "encode", "--file", str(path)]
    )
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    assert key.startswith("aegan_") and find_key(read_keys(path), key).name == "alice"
    listed = runner.invoke(main, ["keys", "list"], env={"AEGAN_API_KEYS_FILE": str(path)})
    assert listed.exit_code == 0 and listed.stdout.startswith("alice\tencode\t")
    assert key not in listed.output
    again = runner.invoke(main, ["keys", "create", "alice", "--file", str(path)])
    assert again.exit_code != 0 and "exists already" in again.output
    assert runner.invoke(main, ["keys", "revoke", "alice", "--file", str(path)]).exit_code == 0
    assert read_keys(path) == []
    gone = runner.invoke(main, ["keys", "revoke", "alice", "--file", str(path)])
    assert gone.exit_code != 0 and "no key named 'alice'" in gone.output
    # the write is atomic: no temporary file is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]


def test_the_keyring_follows_the_file_and_keeps_the_last_good_keys(tmp_path):
    path = tmp_path / "keys.json"
    first = create_key(path, "a", ["generate"])
    problems: list[str] = []
    ring = KeyRing(path, on_error=problems.append)
    assert [k.name for k in ring.current()] == ["a"]
    second = create_key(path, "b", ["generate"])
    assert find_key(ring.current(), second).name == "b"
    path.write_text("{broken")
    assert [k.name for k in ring.current()] == ["a", "b"]
    assert [k.name for k in ring.current()] == ["a", "b"]
    assert len(problems) == 1 and "is not JSON" in problems[0]
    revoke_key_after_break = tmp_path / "fresh.json"
    create_key(revoke_key_after_break, "c", ["encode"])
    os.replace(revoke_key_after_break, path)  # as a Kubernetes Secret update swaps the file
    assert [k.name for k in ring.current()] == ["c"] and find_key(ring.current(), first) is None
    path.unlink()  # a file removed: the last keys kept, and said once
    assert [k.name for k in ring.current()] == ["c"] and [k.name for k in ring.current()] == ["c"]
    assert problems[1:] == [
        f"cannot read the keys file {path}: No such file or directory; "
        "still using the 1 keys read before"
    ]


def test_a_keys_file_removed_right_after_start_is_said(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, "a", ["generate"])
    problems: list[str] = []
    ring = KeyRing(path, on_error=problems.append)
    path.unlink()
    assert [k.name for k in ring.current()] == ["a"]
    assert len(problems) == 1 and "cannot read the keys file" in problems[0]


# --- the service with keys on --------------------------------------------------------------------


def test_no_key_is_401_with_a_challenge_and_health_stays_open(keyed):
    client, _, _ = keyed
    answer = client.post("/generate", json={"n": 1})
    assert error_of(answer, 401) == (
        "this server needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
    )
    assert answer.headers["www-authenticate"] == 'Bearer realm="aegan"'
    for path in ("/livez", "/readyz"):
        assert client.get(path).status_code == 200
    assert client.get("/docs.json").status_code == 200
    assert client.get("/ui/").status_code == 200  # the page; its calls need the key
    assert client.post("/info").status_code == 401


def test_keys_by_either_header_and_scopes(keyed, image_bundle):
    from service_helpers import files, gradient, image_bytes

    client, _, made = keyed
    assert client.post("/generate", json={"n": 1}, headers=bearer(made["gen"])).status_code == 200
    assert (
        client.post("/sample", json={"n": 1}, headers={"X-API-Key": made["gen"]}).status_code == 200
    )
    upload = files(image_bytes(gradient()))
    assert client.post("/encode", files=upload, headers=bearer(made["enc"])).status_code == 200
    refused = client.post("/encode", files=upload, headers=bearer(made["gen"]))
    assert "has no 'encode' scope" in error_of(refused, 403)
    assert "'gen'" in refused.json()["error"]
    assert (
        client.post(
            "/decode", json={"latents": [[0.0] * 32]}, headers=bearer(made["enc"])
        ).status_code
        == 403
    )
    # /similar and /gallery/image need 'search' (this server has no gallery: past the gate, 404)
    similar = client.post("/similar", json={"latents": [[0.0] * 32]}, headers=bearer(made["enc"]))
    assert "has no 'search' scope" in error_of(similar, 403)
    found = client.post("/similar", json={"latents": [[0.0] * 32]}, headers=bearer(made["root"]))
    assert found.status_code == 404
    for path, body in (("/generate", {"n": 1}), ("/info", None)):
        assert client.post(path, json=body, headers=bearer(made["root"])).status_code == 200
    assert client.post("/info", headers=bearer(made["enc"])).status_code == 200  # any key
    # /metrics: admin only (metrics are off in-process, so admin gets BentoML's 404)
    assert error_of(client.get("/metrics", headers=bearer(made["gen"])), 403) == (
        "the key 'gen' has no 'admin' scope, which /metrics needs (it has: generate)"
    )
    # a CORS preflight carries no key, and is not refused for it
    preflight = client.options("/generate", headers={"Origin": "https://example.org"})
    assert preflight.status_code == 405
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(made["root"])).status_code == 404


def test_metrics_can_be_public(image_bundle, keys):
    path, _ = keys
    with serve(image_bundle, AEGAN_API_KEYS_FILE=str(path), AEGAN_METRICS_PUBLIC="1") as client:
        assert client.get("/metrics").status_code == 404  # not 401: metrics are off in-process
        assert client.post("/generate", json={"n": 1}).status_code == 401


NOT_BEARER = "the Authorization header must be 'Bearer KEY'"
MALFORMED = "the API key is malformed (a key is letters, digits and -._~+/=)"
NOT_VALID = "the API key is not valid (unknown or revoked)"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param([("Authorization", "Bearer")], NOT_BEARER, id="bearer-without-a-key"),
        pytest.param([("Authorization", "Basic dXNlcjpwYXNz")], NOT_BEARER, id="basic"),
        pytest.param(
            [("Authorization", "Bearer " + "a" * 5000)],
            "the Authorization header is longer than 1024 bytes",
            id="bearer-5000-bytes",
        ),
        pytest.param(  # 1024 bytes is not longer than the limit: refused for its key's length
            [("Authorization", "Bearer " + "a" * 1017)], MALFORMED, id="bearer-1024-bytes"
        ),
        pytest.param(
            [("X-API-Key", "a" * 5000)],
            "the X-API-Key header is over 1024 bytes",
            id="x-api-key-5000-bytes",
        ),
        pytest.param([("X-API-Key", "a" * 1024)], MALFORMED, id="x-api-key-1024-bytes"),
        pytest.param([("X-API-Key", "a" * 257)], MALFORMED, id="key-of-257-characters"),
        pytest.param([("X-API-Key", "a" * 256)], NOT_VALID, id="key-of-256-characters"),
        pytest.param(
            [("Authorization", "Bearer aegan_\x7f\x01")], MALFORMED, id="control-characters"
        ),
        pytest.param([("Authorization", "Bearer a b c")], MALFORMED, id="spaces"),
        pytest.param(
            [("Authorization", "Bearer x"), ("X-API-Key", "y")],
            "the request carries more than one API key",
            id="both-headers",
        ),
        pytest.param(
            [("Authorization", "Bearer x"), ("Authorization", "Bearer y")],
            "the request carries more than one API key",
            id="two-bearers",
        ),
        pytest.param([("Authorization", "Bearer " + "é" * 10)], MALFORMED, id="non-ascii"),
        pytest.param([("X-API-Key", "")], MALFORMED, id="empty-x-api-key"),
        pytest.param([("Authorization", "Bearer aegan_nope")], NOT_VALID, id="unknown-key"),
    ],
)
def test_malformed_or_wrong_authorization_is_401_never_500(keyed, headers, message):
    client, _, _ = keyed
    encoded = [(k.encode(), v.encode("utf-8")) for k, v in headers]
    answer = client.post("/generate", json={"n": 1}, headers=encoded)
    assert error_of(answer, 401) == message
    error = "invalid_token" if message == NOT_VALID else "invalid_request"
    assert answer.headers["www-authenticate"] == f'Bearer realm="aegan", error="{error}"'


def test_keys_are_picked_up_and_revoked_without_a_restart(keyed):
    client, path, made = keyed
    late = create_key(path, "late", ["generate"])
    assert client.post("/generate", json={"n": 1}, headers=bearer(late)).status_code == 200
    revoke_key(path, "gen")
    answer = client.post("/generate", json={"n": 1}, headers=bearer(made["gen"]))
    assert "not valid" in error_of(answer, 401)
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]


def test_wrong_keys_are_rate_limited_per_address(image_bundle, keys):
    path, made = keys
    with serve(
        image_bundle, AEGAN_API_KEYS_FILE=str(path), AEGAN_AUTH_FAILURES_PER_MIN="3"
    ) as client:
        # a malformed header counts as a wrong key; no key at all does not
        for headers in ({}, bearer("aegan_wrong"), {"Authorization": "Basic x"}, bearer("a b")):
            assert client.post("/generate", json={}, headers=headers).status_code == 401
        blocked = client.post("/generate", json={}, headers=bearer("aegan_wrong"))
        assert error_of(blocked, 429).startswith(
            "too many wrong API keys from this address (3 a minute, AEGAN_AUTH_FAILURES_PER_MIN)"
        )
        # another address is counted apart (the same app, another client address)
        other = TestClient(client.app, client=("192.0.2.7", 50000), raise_server_exceptions=False)
        assert other.post("/generate", json={}, headers=bearer("aegan_wrong")).status_code == 401
        assert other.post("/generate", json={}, headers=bearer(made["gen"])).status_code == 200
        assert 50 <= int(blocked.headers["retry-after"]) <= 60  # when the first failure leaves
        # the address is refused before its key is looked at, even a good one
        assert client.post("/generate", json={}, headers=bearer(made["gen"])).status_code == 429
        assert client.get("/livez").status_code == 200


def test_concurrent_callers_each_get_their_own_answer(keyed):
    client, _, made = keyed

    def call(i: int) -> tuple[int, int]:
        key = (made["gen"], made["enc"], "aegan_wrong_" + "x" * (i % 3))[i % 3]
        answer = client.post("/generate", json={"n": 1, "seed": i}, headers=bearer(key))
        return i, answer.status_code

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(36)))
    assert [status for _, status in results] == [(200, 403, 401)[i % 3] for i, _ in results]


def test_no_key_in_answers_or_logs(keyed, caplog):
    client, _, made = keyed
    with caplog.at_level(logging.DEBUG):
        answers = [
            client.post("/generate", json={"n": 1}, headers=bearer(made["gen"])),
            client.post("/encode", json={}, headers=bearer(made["gen"])),
            client.post("/generate", json={"n": 1}, headers=bearer(made["gen"] + "x")),
            client.post("/generate", json={"n": "x"}, headers={"X-API-Key": made["root"]}),
        ]
    seen = caplog.text + "".join(a.text + json.dumps(dict(a.headers)) for a in answers)
    for key in made.values():
        assert key not in seen and key[6:20] not in seen
    assert "key=gen" in caplog.text and "key=root" in caplog.text  # names, not keys


def test_each_refused_request_is_one_line_with_its_reason_key_name_and_address(keyed, caplog):
    client, _, made = keyed
    with caplog.at_level(logging.INFO, logger="bentoml.aegan_serve.requests"):
        client.post("/generate", json={"n": 1})
        client.post("/encode", json={}, headers=bearer(made["gen"]))
        client.post("/generate", json={"n": "x"}, headers=bearer(made["gen"]))
        client.get("/nowhere", headers=bearer(made["gen"]))
        client.post("/generate", json={"n": 1}, headers=bearer(made["gen"]))
        client.get("/livez")
    assert [r.getMessage() for r in caplog.records if r.name == "bentoml.aegan_serve.requests"] == [
        "POST /generate 401 key=- client=testclient: this server needs an API key: send "
        "'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
        "POST /encode 403 key=gen client=testclient: the key 'gen' has no 'encode' scope, which "
        "/encode needs (it has: generate)",
        "POST /generate 400 key=gen client=testclient: n: Input should be a valid integer",
        "GET /nowhere 404 key=gen client=testclient: Not Found",  # a body that is not JSON
    ]  # and no line for a 200


# What the gate logs of answers made behind it: (status, body in one or more messages).
ANSWERS = {
    "/one-error": (400, [b'{"error": "the reason"}']),
    "/list-of-one": (400, [b'[{"error": "only this"}]']),
    "/list-of-two": (400, [b'[{"error": "a"}, {"error": "b"}]']),
    "/no-error-field": (422, [b'{"detail": "x"}']),
    "/error-not-text": (409, [b'{"error": 7}']),
    "/a-number": (409, [b"7"]),
    "/not-utf-8": (400, [b"bad \xff byte"]),
    "/utf-16": (400, ['{"detail": "x"}'.encode("utf-16")]),  # JSON, and not UTF-8
    "/in-pieces": (404, [b'{"error": "in ', b'two pieces"}']),
    "/long": (413, [b'{"error": "' + b"y" * 5000 + b'"}']),  # read up to 4096 bytes: not JSON
    "/4096-bytes": (413, [b'{"error": "' + b"y" * (4096 - 13) + b'"}']),  # read whole
    "/4097-bytes": (413, [b'{"error": "' + b"y" * 3989, b"y" * 95 + b'"}']),  # cut at 4096
    "/ends-bare": (403, [b'{"error": "ended"}', None]),  # a last message with no keys but type
    "/last-4xx": (499, [b'{"error": "last"}']),
    "/unavailable": (503, [b'{"error": "store down"}']),
    "/server-error": (500, [b'{"error": "a bug"}']),
    "/redirect": (399, [b"elsewhere"]),
    "/ok": (200, [b"{}"]),
}


async def answering_app(scope, receive, send):
    status, pieces = ANSWERS[scope["path"]]
    await send({"type": "http.response.start", "status": status, "headers": []})
    for i, piece in enumerate(pieces):
        if piece is None:
            await send({"type": "http.response.body"})
        else:
            more = i < len(pieces) - 1
            await send({"type": "http.response.body", "body": piece, "more_body": more})


def test_the_log_line_of_a_refusal_takes_the_error_of_its_body(caplog):
    from aegan_serve.auth import Gate

    client = TestClient(Gate(answering_app, scopes={}), raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="bentoml.aegan_serve.requests"):
        for path in ANSWERS:
            client.get(path)
    long = '{"error": "' + "y" * (300 - 11) + "..."
    lines = [r.getMessage() for r in caplog.records if r.name == "bentoml.aegan_serve.requests"]
    # the body of /utf-16 as its bytes are, its byte-order mark not UTF-8
    assert lines.pop(7).startswith(
        'GET /utf-16 400 key=- client=testclient: \\ufffd\\ufffd{\\x00"\\x00d\\x00e\\x00t'
    )
    assert lines == [
        "GET /one-error 400 key=- client=testclient: the reason",
        "GET /list-of-one 400 key=- client=testclient: only this",
        'GET /list-of-two 400 key=- client=testclient: [{"error": "a"}, {"error": "b"}]',
        'GET /no-error-field 422 key=- client=testclient: {"detail": "x"}',
        'GET /error-not-text 409 key=- client=testclient: {"error": 7}',
        "GET /a-number 409 key=- client=testclient: 7",
        "GET /not-utf-8 400 key=- client=testclient: bad \\ufffd byte",
        "GET /in-pieces 404 key=- client=testclient: in two pieces",
        f"GET /long 413 key=- client=testclient: {long}",
        f"GET /4096-bytes 413 key=- client=testclient: {'y' * 300}...",
        f"GET /4097-bytes 413 key=- client=testclient: {long}",
        "GET /ends-bare 403 key=- client=testclient: ended",
        "GET /last-4xx 499 key=- client=testclient: last",
        "GET /unavailable 503 key=- client=testclient: store down",
    ]


async def echoing_app(scope, receive, send):
    """Refuses every request with the body it read and the caller it was given."""
    from aegan_serve.auth import CALLER

    request = await receive()
    caller = CALLER.get()
    who = caller.who if caller else "no caller"
    body = json.dumps({"error": f"{request['body'].decode()} from {who}"}).encode()
    await send({"type": "http.response.start", "status": 400, "headers": []})
    await send({"type": "http.response.body", "body": body})


def gate_answers(gate, path: str, body: bytes, **scope: object) -> tuple[list[dict], object]:
    """The messages ``gate`` sends for ``POST path`` with ``body``, and the caller in force after
    it (in the same context)."""
    from aegan_serve.auth import CALLER

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    async def call():
        await gate(
            {"type": "http", "method": "POST", "path": path, "headers": [], **scope}, receive, send
        )
        return CALLER.get()

    after = asyncio.run(call())
    return sent, after


def test_the_gate_passes_the_request_on_and_logs_an_unknown_address_as_a_dash(caplog):
    from aegan_serve.auth import Gate

    gate = Gate(echoing_app, scopes={"/echo": None})
    with caplog.at_level(logging.INFO, logger="bentoml.aegan_serve.requests"):
        open_path, _ = gate_answers(gate, "/livez", b"ping")  # a server that knows no address
        route, after = gate_answers(gate, "/echo", b"pong", client=None)
        addressed, _ = gate_answers(gate, "/echo", b"pang", client=("10.0.0.7", 5000))
    assert open_path[-1]["body"] == b'{"error": "ping from no caller"}'
    assert route[-1]["body"] == b'{"error": "pong from address:-"}'
    assert addressed[-1]["body"] == b'{"error": "pang from address:10.0.0.7"}'
    assert after is None  # the caller of a request ends with it
    lines = [r.getMessage() for r in caplog.records if r.name == "bentoml.aegan_serve.requests"]
    assert lines == [
        "POST /livez 400 key=- client=-: ping from no caller",
        "POST /echo 400 key=- client=-: pong from address:-",
        "POST /echo 400 key=- client=10.0.0.7: pang from address:10.0.0.7",
    ]


def test_without_keys_each_address_has_its_own_request_budget(monkeypatch):
    from aegan_serve.auth import Gate

    monkeypatch.setenv("AEGAN_QUOTA_REQUESTS_PER_S", "0.1")  # 2 in any 20 s
    monkeypatch.setenv("AEGAN_QUOTA_REQUESTS_BURST", "2")
    gate = Gate(echoing_app, scopes={"/echo": None})
    first = [gate_answers(gate, "/echo", b"x", client=("10.0.0.1", 1))[0] for _ in range(3)]
    second = gate_answers(gate, "/echo", b"x", client=("10.0.0.2", 1))[0]
    assert [sent[0]["status"] for sent in first] == [400, 400, 429]
    assert second[0]["status"] == 400  # the budget of 10.0.0.1 is not that of 10.0.0.2


def test_a_keys_file_broken_while_serving_is_logged_once_and_its_last_keys_kept(keyed, caplog):
    client, path, made = keyed
    path.write_text("{broken")
    with caplog.at_level(logging.ERROR, logger="bentoml.aegan_serve.auth"):
        for _ in range(2):
            answer = client.post("/generate", json={"n": 1}, headers=bearer(made["gen"]))
            assert answer.status_code == 200
    errors = [r for r in caplog.records if r.name == "bentoml.aegan_serve.auth"]
    assert [(r.levelno, r.getMessage()) for r in errors] == [
        (
            logging.ERROR,
            f"keys file {path} is not JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1); still using the 3 keys read before",
        )
    ]


def test_a_created_key_records_when_in_utc_to_the_second(tmp_path):
    from datetime import UTC, datetime

    path = tmp_path / "keys.json"
    before = datetime.now(UTC).replace(microsecond=0)
    create_key(path, "a", ["generate"])
    (key,) = read_keys(path)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", key.created), key.created
    assert before <= datetime.fromisoformat(key.created) <= datetime.now(UTC)
    assert json.loads(path.read_text())["keys"][0]["created"] == key.created
