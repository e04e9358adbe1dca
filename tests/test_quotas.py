"""Quotas: the settings, the request and image budgets with their 429, Retry-After and RateLimit
headers (in-process), what an unreachable Redis does in each failure mode, and end to end: two
workers sharing one budget through a real Redis, Redis killed under load, and the log lines of a
burst of refused requests."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from redis_helpers import Redis, free_port
from service_helpers import bentoml_serve, error_of, serve

from aegan_serve.apikeys import create_key
from aegan_serve.config import SettingsError
from aegan_serve.quotas import Budget, QuotaSettings

# --- settings ------------------------------------------------------------------------------------


def test_budgets_are_a_rate_and_a_burst():
    settings = QuotaSettings.from_env(
        {
            "AEGAN_QUOTA_REQUESTS_PER_S": "5",
            "AEGAN_QUOTA_REQUESTS_BURST": "20",
            "AEGAN_QUOTA_IMAGES_PER_S": "0.5",
            "AEGAN_RATE_LIMIT_STORAGE": "redis://:secret@cache:6379/2",
        }
    )
    assert (settings.requests.burst, settings.requests.window_s) == (20, 4)
    assert (settings.images.burst, settings.images.window_s) == (1, 2)
    assert settings.policies() == '"requests";q=20;w=4, "images";q=1;w=2'
    assert settings.shared and settings.failure == "local"
    off = QuotaSettings.from_env({})
    assert off.requests is None and off.images is None and not off.shared


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"AEGAN_QUOTA_REQUESTS_PER_S": "fast"},
            "AEGAN_QUOTA_REQUESTS_PER_S='fast' is not a number",
        ),
        ({"AEGAN_QUOTA_REQUESTS_PER_S": "-1"}, "must be a number above 0"),
        ({"AEGAN_QUOTA_IMAGES_PER_S": "inf"}, "_IMAGES_PER_S='inf' must be a finite number"),
        (
            {"AEGAN_QUOTA_REQUESTS_PER_S": "10", "AEGAN_QUOTA_REQUESTS_BURST": "25"},
            "a window of 2.5 s; the burst must be the rate times a whole number of seconds, at "
            "least 1 (for example 20 or 30)",
        ),
        ({"AEGAN_QUOTA_REQUESTS_BURST": "5"}, "AEGAN_QUOTA_REQUESTS_PER_S is not"),
        ({"AEGAN_RATE_LIMIT_STORAGE": "http://cache:6379"}, "must start with memory://, redis://"),
        ({"AEGAN_RATE_LIMIT_STORAGE": "redis://cache:port"}, "Port could not be cast"),
        ({"AEGAN_RATE_LIMIT_STORAGE": "redis://"}, "names no Redis host"),
        ({"AEGAN_RATE_LIMIT_STORAGE": "redis://cache/db"}, "the database 'db' must be a number"),
        ({"AEGAN_RATE_LIMIT_FAILURE": "maybe"}, "must be one of local, open, closed"),
        ({"AEGAN_AUTH_FAILURES_PER_MIN": "0"}, "must be at least 1"),
    ],
)
def test_bad_quota_settings_are_refused_naming_the_variable(environ, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        QuotaSettings.from_env(environ)


WHOLE_SECONDS = "the burst must be the rate times a whole number of seconds, at least 1"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"AEGAN_QUOTA_REQUESTS_PER_S": "10", "AEGAN_QUOTA_REQUESTS_BURST": "25"},
            "AEGAN_QUOTA_REQUESTS_BURST=25 over AEGAN_QUOTA_REQUESTS_PER_S=10 is a window of "
            f"2.5 s; {WHOLE_SECONDS} (for example 20 or 30)",
        ),
        (
            {"AEGAN_QUOTA_REQUESTS_PER_S": "10", "AEGAN_QUOTA_REQUESTS_BURST": "5"},
            "AEGAN_QUOTA_REQUESTS_BURST=5 over AEGAN_QUOTA_REQUESTS_PER_S=10 is a window of "
            f"0.5 s; {WHOLE_SECONDS} (for example 10)",
        ),
        (  # one taken burst below, one above
            {"AEGAN_QUOTA_REQUESTS_PER_S": "10", "AEGAN_QUOTA_REQUESTS_BURST": "15"},
            "AEGAN_QUOTA_REQUESTS_BURST=15 over AEGAN_QUOTA_REQUESTS_PER_S=10 is a window of "
            f"1.5 s; {WHOLE_SECONDS} (for example 10 or 20)",
        ),
        (
            {"AEGAN_QUOTA_IMAGES_BURST": "5"},
            "AEGAN_QUOTA_IMAGES_BURST is set but AEGAN_QUOTA_IMAGES_PER_S is not",
        ),
        (
            {"AEGAN_QUOTA_REQUESTS_BURST": "5"},
            "AEGAN_QUOTA_REQUESTS_BURST is set but AEGAN_QUOTA_REQUESTS_PER_S is not",
        ),
    ],
)
def test_a_burst_that_is_no_whole_window_is_refused_with_the_whole_message(environ, message):
    with pytest.raises(SettingsError) as caught:
        QuotaSettings.from_env(environ)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("rate", "message"),
    [  # the default burst is the rate rounded up; the examples are bursts that are taken
        (
            "2.5",
            "BURST=3 over AEGAN_QUOTA_IMAGES_PER_S=2.5 is a window of 1.2 s; {} (for example 5)",
        ),
        (
            "0.3",
            "BURST=1 over AEGAN_QUOTA_IMAGES_PER_S=0.3 is a window of 3.33333 s; {} "
            "(for example 3)",
        ),
        (
            "0.3333",
            "BURST=1 over AEGAN_QUOTA_IMAGES_PER_S=0.3333 is a window of 3.0003 s; {} (none is, "
            "for windows up to an hour: give a rate that a whole number of seconds makes whole, "
            "such as 0.25 or 2.5)",
        ),
        (  # 2 is taken with a window of 3601 s, one more than an hour
            repr(2 / 3601),
            "BURST=1 over AEGAN_QUOTA_IMAGES_PER_S=0.000555401 is a window of 1800.5 s; {} (none "
            "is, for windows up to an hour: give a rate that a whole number of seconds makes "
            "whole, such as 0.25 or 2.5)",
        ),
        (  # a rate so small that windows of 1 to 3 s make it round to a burst of 0, no example
            "3e-10",
            "BURST=1 over AEGAN_QUOTA_IMAGES_PER_S=3e-10 is a window of 3.33333e+09 s; {} (none "
            "is, for windows up to an hour: give a rate that a whole number of seconds makes "
            "whole, such as 0.25 or 2.5)",
        ),
    ],
)
def test_the_default_burst_is_the_rate_rounded_up_and_the_examples_are_taken(rate, message):
    with pytest.raises(SettingsError) as caught:
        QuotaSettings.from_env({"AEGAN_QUOTA_IMAGES_PER_S": rate})
    assert str(caught.value) == "AEGAN_QUOTA_IMAGES_" + message.format(WHOLE_SECONDS)
    example = re.search(r"for example (\d+)", message)
    if example:
        taken = {"AEGAN_QUOTA_IMAGES_PER_S": rate, "AEGAN_QUOTA_IMAGES_BURST": example[1]}
        assert QuotaSettings.from_env(taken).images.burst == int(example[1])


def test_windows_of_whole_seconds_are_taken():
    def budgets(environ: dict[str, str]) -> tuple[object, object]:
        settings = QuotaSettings.from_env(environ)
        return settings.requests, settings.images

    assert budgets({"AEGAN_QUOTA_IMAGES_PER_S": "3", "AEGAN_QUOTA_IMAGES_BURST": "3"}) == (
        None,
        Budget("images", 3, 1),  # a window of exactly 1 s
    )
    assert budgets({"AEGAN_QUOTA_REQUESTS_PER_S": "0.1", "AEGAN_QUOTA_REQUESTS_BURST": "3"}) == (
        Budget("requests", 3, 30),
        None,
    )
    assert budgets({"AEGAN_QUOTA_IMAGES_PER_S": "4"}) == (None, Budget("images", 4, 1))
    assert budgets({"AEGAN_QUOTA_REQUESTS_PER_S": "0.2"}) == (Budget("requests", 1, 5), None)


def clear_of_a_window_end(window_s: int, needed_s: float) -> None:
    """Wait, if need be, until the next end of a ``window_s`` window is ``needed_s`` away.

    ``limits`` aligns its fixed windows to the epoch, and its sliding window counter weighs the
    previous window's count by the part of it still in view: requests on both sides of a window
    end count a little less than they are. A test that counts exactly keeps its requests within
    one window."""
    left = window_s - time.time() % window_s
    if left < needed_s:
        time.sleep(left + 0.05)


# --- in-process ----------------------------------------------------------------------------------


def test_the_request_budget_per_address_when_keys_are_off(image_bundle):
    env = {"AEGAN_QUOTA_REQUESTS_PER_S": "1", "AEGAN_QUOTA_REQUESTS_BURST": "3"}
    with serve(image_bundle, **env) as client:
        clear_of_a_window_end(3, 1.5)
        answers = [client.post("/generate", json={"n": 1}) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[0].headers["ratelimit-policy"] == '"requests";q=3;w=3'
        assert re.fullmatch(r'"requests";r=2;t=[0-3]', answers[0].headers["ratelimit"])
        assert re.fullmatch(r'"requests";r=0;t=[0-3]', answers[2].headers["ratelimit"])
        refused = answers[3]
        assert "request quota spent: 3 requests per 3 s" in error_of(refused, 429)
        assert 1 <= int(refused.headers["retry-after"]) <= 3
        assert client.get("/livez").status_code == 200  # health is not counted
        document = client.get("/docs.json").json()  # not counted; no 503 in the `local` mode
        assert "503" not in document["paths"]["/generate"]["post"]["responses"]


def test_the_image_budget_counts_the_images_of_each_request(image_bundle, tmp_path):
    keys = tmp_path / "keys.json"
    a, b = create_key(keys, "a", ["generate"]), create_key(keys, "b", ["generate"])
    env = {
        "AEGAN_API_KEYS_FILE": str(keys),
        "AEGAN_QUOTA_IMAGES_PER_S": "0.5",
        "AEGAN_QUOTA_IMAGES_BURST": "8",
        "AEGAN_QUOTA_REQUESTS_PER_S": "100",  # both budgets: both in the headers
        "AEGAN_QUOTA_REQUESTS_BURST": "100",
    }
    with serve(image_bundle, **env) as client:

        def generate(key: str, n: int) -> httpx.Response:
            return client.post("/generate", json={"n": n}, headers={"X-API-Key": key})

        clear_of_a_window_end(16, 8.0)
        first = generate(a, 5)
        assert first.status_code == 200
        assert re.fullmatch(r'"requests";r=99;t=\d, "images";r=3;t=\d+', first.headers["ratelimit"])
        spent = generate(a, 5)
        assert "image quota spent: 8 images per 16 s" in error_of(spent, 429)
        # the image budget's own reset, at least 8 s away: not the 1 s of a busy server
        assert 8 <= int(spent.headers["retry-after"]) <= 16
        assert generate(a, 3).status_code == 200  # what is left still fits
        assert generate(b, 8).status_code == 200  # every key has its own budget
        too_many = generate(b, 9)
        assert "more than the 8 a caller may make at once" in error_of(too_many, 400)
        assert (
            client.post(
                "/decode", json={"latents": [[0.0] * 32] * 2}, headers={"X-API-Key": a}
            ).status_code
            == 429
        )


@pytest.mark.parametrize(
    ("mode", "statuses"),
    [("closed", [503, 503, 503]), ("open", [200, 200, 200]), ("local", [200, 200, 429])],
)
def test_an_unreachable_redis_answers_as_the_failure_mode_says(image_bundle, mode, statuses):
    env = {
        "AEGAN_RATE_LIMIT_STORAGE": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
        "AEGAN_RATE_LIMIT_FAILURE": mode,
        "AEGAN_QUOTA_REQUESTS_PER_S": "1",
        "AEGAN_QUOTA_REQUESTS_BURST": "2",
        "AEGAN_WORKERS": "1",
    }
    with serve(image_bundle, **env) as client:
        clear_of_a_window_end(2, 1.0)
        started = time.monotonic()
        answers = [client.post("/generate", json={"n": 1}) for _ in range(3)]
        assert time.monotonic() - started < 5  # a dead Redis costs no time per request
    assert [a.status_code for a in answers] == statuses
    if mode == "closed":
        assert error_of(answers[0], 503) == (
            "the quota store (AEGAN_RATE_LIMIT_STORAGE) cannot be reached, and "
            "AEGAN_RATE_LIMIT_FAILURE=closed refuses requests until it can; retry shortly"
        )
        assert answers[0].headers["retry-after"] == "1"
    if mode == "open":
        assert "ratelimit" not in answers[0].headers


def test_while_redis_is_unreachable_each_key_counts_its_own_local_budget(image_bundle, tmp_path):
    keys = tmp_path / "keys.json"
    a, b = create_key(keys, "a", ["generate"]), create_key(keys, "b", ["generate"])
    env = {
        "AEGAN_API_KEYS_FILE": str(keys),
        "AEGAN_RATE_LIMIT_STORAGE": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
        "AEGAN_RATE_LIMIT_FAILURE": "local",
        "AEGAN_QUOTA_REQUESTS_PER_S": "0.1",  # 2 in any 20 s
        "AEGAN_QUOTA_REQUESTS_BURST": "2",
        "AEGAN_WORKERS": "1",
    }
    with serve(image_bundle, **env) as client:

        def generate(key: str) -> int:
            return client.post("/generate", json={"n": 1}, headers={"X-API-Key": key}).status_code

        clear_of_a_window_end(20, 5.0)
        assert [generate(a) for _ in range(3)] == [200, 200, 429]
        assert [generate(b) for _ in range(3)] == [200, 200, 429]


def test_a_worker_counts_its_share_until_redis_answers_again_and_says_so(
    image_bundle, tmp_path, monkeypatch, caplog
):
    from aegan_serve import quotas

    monkeypatch.setattr(quotas, "RETRY_DOWN_S", 2.0)  # room for redis-server to start within it
    redis = Redis(tmp_path)  # not started yet
    env = {
        "AEGAN_RATE_LIMIT_STORAGE": redis.url,
        "AEGAN_QUOTA_REQUESTS_PER_S": "0.25",
        "AEGAN_QUOTA_REQUESTS_BURST": "4",  # 4 in any 16 s; a worker's share: 2
        "AEGAN_WORKERS": "2",
    }

    def left(answer: httpx.Response) -> str:
        assert answer.status_code == 200, answer.text
        return re.fullmatch(r'"requests";r=(\d+);t=\d+', answer.headers["ratelimit"])[1]

    try:
        with caplog.at_level(logging.WARNING), serve(image_bundle, **env) as client:
            clear_of_a_window_end(16, 2 * quotas.RETRY_DOWN_S + 2.0)
            down_at = time.monotonic()
            assert left(client.post("/generate", json={"n": 1})) == "1"  # its share, in memory
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert re.fullmatch(
                rf"quota store {re.escape(redis.url)} unreachable \(StorageError: Error \d+ "
                rf"connecting to 127\.0\.0\.1:{redis.port}\..*\); AEGAN_RATE_LIMIT_FAILURE=local "
                r"until it answers",
                warnings[0],
            )
            redis.start()
            assert time.monotonic() - down_at < quotas.RETRY_DOWN_S, "redis-server was slow"
            # not tried again yet: still this worker's share
            assert left(client.post("/generate", json={"n": 1})) == "0"
            time.sleep(max(0.0, down_at + quotas.RETRY_DOWN_S + 0.1 - time.monotonic()))
            assert left(client.post("/generate", json={"n": 1})) == "3"  # the whole budget
            assert left(client.post("/generate", json={"n": 1})) == "2"  # said once only
    finally:
        redis.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[1:] == [f"quota store {redis.url} answers again"]


def test_addresses_that_spent_their_wrong_keys_stay_refused_when_the_others_are_forgotten(
    monkeypatch,
):
    from aegan_serve import quotas

    monkeypatch.setattr(quotas, "MAX_TRACKED_ADDRESSES", 2)  # 100 000 in service

    async def attempts() -> list[bool | None]:
        counter = quotas.Quotas(QuotaSettings.from_env({"AEGAN_AUTH_FAILURES_PER_MIN": "2"}))
        for who in ("a", "a", "b", "c", "d"):  # at "d", three addresses are kept: pruned
            await counter.spend_failure(who)
        return [
            None if left is None else left.allowed
            for left in [await counter.failures_left(who) for who in ("a", "b", "d", "e")]
        ]

    assert asyncio.run(attempts()) == [False, True, True, None]


@pytest.mark.parametrize("silent", ["accepts-and-never-answers", "never-accepts"])
def test_a_redis_that_does_not_answer_is_down_within_a_fraction_of_a_second(silent):
    from aegan_serve import quotas

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    # with its one queue place taken, the listener lets no further connection complete
    filler = socket.create_connection(("127.0.0.1", port)) if silent == "never-accepts" else None
    settings = QuotaSettings.from_env(
        {
            "AEGAN_RATE_LIMIT_STORAGE": f"redis://127.0.0.1:{port}/0",
            "AEGAN_RATE_LIMIT_FAILURE": "closed",
            "AEGAN_QUOTA_REQUESTS_PER_S": "1",
        }
    )
    assert settings.requests is not None

    async def spend() -> float:
        counter = quotas.Quotas(settings)
        started = time.monotonic()
        with pytest.raises(quotas.StorageDown):
            await asyncio.wait_for(counter.spend(settings.requests, "a"), 10)
        return time.monotonic() - started

    try:
        assert asyncio.run(spend()) < 2  # REDIS_TIMEOUT_S is 0.25 s
    finally:
        if filler is not None:
            filler.close()
        listener.close()


def test_the_counts_in_redis_are_named_under_aegan(tmp_path):
    import redis as redis_client

    from aegan_serve import quotas

    server = Redis(tmp_path)
    server.start()
    try:
        settings = QuotaSettings.from_env(
            {"AEGAN_RATE_LIMIT_STORAGE": server.url, "AEGAN_QUOTA_REQUESTS_PER_S": "1"}
        )
        assert settings.requests is not None
        decision = asyncio.run(quotas.Quotas(settings).spend(settings.requests, "key:a"))
        assert decision is not None and decision.allowed
        names = redis_client.Redis.from_url(server.url).keys()
        assert names and all(name.startswith(b"aegan:") for name in names), names
    finally:
        server.stop()


def test_a_window_already_reset_is_t_0_in_the_ratelimit_header_never_negative():
    from limits.util import WindowStats

    from aegan_serve import quotas

    class Reset:  # a store whose window ended between the hit and the read (a key expiring)
        async def hit(self, item: object, who: str, cost: int = 1) -> bool:
            return True

        async def get_window_stats(self, item: object, who: str) -> WindowStats:
            return WindowStats(time.time() - 0.5, 4)

    decision = asyncio.run(quotas._spend(Reset(), quotas.Budget("requests", 5, 1), "a", 1))
    assert decision.header() == '"requests";r=4;t=0'
    assert decision.retry_after == 1


# --- end to end: two workers, one Redis ----------------------------------------------------------

BURST, WINDOW_S = 10, 2  # per key: 10 requests in any 2 s, 5 per second
SECONDS = 8.0  # of load per key


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory):
    server = Redis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared(image_bundle: Path, redis: Redis, tmp_path_factory: pytest.TempPathFactory):
    """`bentoml serve` with 2 workers, keys on, a request budget shared through Redis."""
    folder = tmp_path_factory.mktemp("shared")
    keys = {name: create_key(folder / "keys.json", name, ["generate"]) for name in ("a", "b")}
    env = {
        **os.environ,
        "AEGAN_MODEL": str(image_bundle),
        "AEGAN_DEVICE": "cpu",
        "AEGAN_WORKERS": "2",
        "AEGAN_API_KEYS_FILE": str(folder / "keys.json"),
        "AEGAN_RATE_LIMIT_STORAGE": redis.url,
        "AEGAN_QUOTA_REQUESTS_PER_S": str(BURST // WINDOW_S),
        "AEGAN_QUOTA_REQUESTS_BURST": str(BURST),
    }
    log = folder / "serve.log"
    try:
        with bentoml_serve("aegan_serve.service:AEGAN", env=env, log=log) as (url, _):
            yield url, keys, log
    finally:
        print(log.read_text(errors="replace")[-3000:])


def hammer(url: str, key: str, seconds: float, clients: int = 6) -> Counter[str]:
    """``clients`` threads calling /generate with ``key`` for ``seconds``: answers by status."""
    statuses: Counter[str] = Counter()
    stop = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": key}) as http:
            while time.monotonic() < stop:
                try:
                    status = str(http.post("/generate", json={"n": 1}).status_code)
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                statuses[status] += 1
                if status == "429":
                    time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_two_workers_share_each_keys_budget_through_redis(shared):
    url, keys, _ = shared
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda k: hammer(url, keys[k], SECONDS), ("a", "b"))
    rate = BURST / WINDOW_S
    for statuses in (a, b):
        assert set(statuses) <= {"200", "429"}, statuses
        assert statuses["429"] > 0
        # the rate, give or take a burst (counted per worker, it would be about twice the rate)
        assert rate * SECONDS - BURST <= statuses["200"] <= rate * SECONDS + BURST, statuses


def test_redis_killed_under_load_then_quotas_hold_again(shared, redis):
    url, keys, _ = shared
    time.sleep(WINDOW_S)
    outcome: dict[str, Counter[str]] = {}
    loader = threading.Thread(target=lambda: outcome.update(load=hammer(url, keys["a"], 6.0)))
    loader.start()
    time.sleep(1.5)
    redis.stop()
    time.sleep(2.0)
    redis.start()
    loader.join()
    # no 5xx, no broken connection: each worker counted its share in memory while Redis was away
    assert set(outcome["load"]) <= {"200", "429"}, outcome["load"]
    time.sleep(WINDOW_S + 1.5)  # Redis is tried again at most once a second
    after = hammer(url, keys["b"], 1.0)
    assert set(after) == {"200", "429"} and after["200"] <= BURST, after


def test_a_burst_of_refused_requests_writes_one_line_each_and_no_traceback(shared):
    url, keys, log = shared
    bad = [
        ("post", "/generate", {"json": {"n": 1}}),  # no key: 401
        ("post", "/generate", {"json": {"n": 1}, "headers": {"X-API-Key": "aegan_wrong"}}),
        ("post", "/generate", {"json": {"n": True}, "headers": {"X-API-Key": keys["a"]}}),
        ("post", "/decode", {"json": {"latents": [[1e9]]}, "headers": {"X-API-Key": keys["a"]}}),
        ("post", "/encode", {"content": b"{", "headers": {"X-API-Key": keys["a"]}}),
        ("post", "/generate", {"content": b"x" * 2_000_000, "headers": {"X-API-Key": keys["a"]}}),
        ("get", "/nowhere%0Aforged%20line", {"headers": {"X-API-Key": keys["a"]}}),
    ]
    time.sleep(WINDOW_S + 1)
    before = log.stat().st_size
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(140):
            method, path, kwargs = bad[i % len(bad)]
            statuses[getattr(http, method)(path, **kwargs).status_code] += 1
    assert all(400 <= s < 500 for s in statuses), statuses
    time.sleep(1.0)
    written = log.read_bytes()[before:].decode(errors="replace").splitlines()
    refusals = [line for line in written if re.search(r"\] (GET|POST) /.* 4\d\d key=", line)]
    assert len(refusals) == 140, (statuses, "\n".join(written[-10:]))
    assert len(written) == 140, "\n".join(line for line in written if line not in refusals)[:3000]
    assert not any("Traceback" in line for line in written)
    assert any("key=a" in line and " 400 " in line for line in refusals)
    assert any("/nowhere\\nforged line 404" in line for line in refusals)  # one line, escaped
    assert keys["a"] not in "".join(written)


def test_a_budgets_share_keeps_its_name_and_window():
    from aegan_serve.quotas import Budget

    assert Budget("images", 10, 5).share(2) == Budget("images", 5, 5)
    assert Budget("requests", 3, 1).share(8) == Budget("requests", 1, 1)  # at least one unit
    assert Budget("images", 7, 5).share(2) == Budget("images", 3, 5)  # whole units


def test_the_workers_a_quota_is_shared_by_are_kept():
    environ = {"AEGAN_QUOTA_REQUESTS_PER_S": "4"}
    assert QuotaSettings.from_env(environ).workers == 1
    assert QuotaSettings.from_env(environ, workers=3).workers == 3
