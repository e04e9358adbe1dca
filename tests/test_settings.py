"""The service's environment schema (aegan_serve/config.py, Environment): every declared bound and
choice is enforced with a message naming the variable, found by walking the declarations."""

from __future__ import annotations

import typing

import annotated_types
import pytest
from pydantic import ValidationError

from aegan_serve.config import (
    Environment,
    Settings,
    SettingsError,
    env_var,
    read_environment,
)


def _choices(annotation: object) -> tuple[str, ...]:
    """The allowed values of a Literal field (inside Annotated), or ()."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return ()


def violations() -> list[tuple[str, str, str]]:
    """(field, a value breaking one of its declarations, what the message must say) for every
    declared bound and choice of Environment."""
    found = []
    for name, field in Environment.model_fields.items():
        for bound in field.metadata:
            if isinstance(bound, annotated_types.Ge):
                found.append((name, str(bound.ge - 1), f"must be at least {bound.ge}"))
            elif isinstance(bound, annotated_types.Gt):
                found.append((name, str(bound.gt), f"must be a number above {bound.gt}"))
        if _choices(field.annotation):
            choices = ", ".join(_choices(field.annotation))
            found.append((name, "neither", f"must be one of {choices}"))
    return found


@pytest.mark.parametrize(("name", "value", "says"), violations(), ids=lambda v: str(v)[:24])
def test_every_declared_bound_and_choice_is_enforced_naming_the_variable(name, value, says):
    with pytest.raises(SettingsError) as caught:
        read_environment({env_var(name): value})
    assert str(caught.value).startswith(f"{env_var(name)}=")
    assert says in str(caught.value)


def test_the_walk_finds_the_bounds_it_should():
    found = {name for name, _, _ in violations()}
    assert len(found) >= 20  # a walk finding nothing would test nothing
    assert {"workers", "max_steps", "cuda_mem_limit", "quota_images_per_s", "device"} <= found
    assert {"cuda_algo_search", "cuda_arena", "rate_limit_failure"} <= found


def test_each_bound_admits_its_edge():
    """The value at each lower bound is accepted (the walk's violations are one step past it)."""
    for name, field in Environment.model_fields.items():
        for bound in field.metadata:
            if isinstance(bound, annotated_types.Ge):
                assert getattr(read_environment({env_var(name): str(bound.ge)}), name) == bound.ge


def test_every_wrong_variable_is_named_at_once():
    with pytest.raises(SettingsError) as caught:
        read_environment({"AEGAN_MAX_N": "many", "AEGAN_FP16": "yes", "AEGAN_DEVICE": "tpu"})
    message = str(caught.value)
    assert "AEGAN_MAX_N='many' is not an integer" in message
    assert "AEGAN_FP16='yes' must be 0 or 1" in message
    assert "AEGAN_DEVICE='tpu' must be one of auto, cuda, cpu" in message


def test_each_kind_of_mistake_has_its_sentence():
    said = {
        "AEGAN_MAX_N": ("2.5", "AEGAN_MAX_N='2.5' is not an integer"),
        "AEGAN_QUOTA_IMAGES_PER_S": ("fast", "AEGAN_QUOTA_IMAGES_PER_S='fast' is not a number"),
        "AEGAN_QUOTA_REQUESTS_PER_S": ("inf", "AEGAN_QUOTA_REQUESTS_PER_S='inf' must be a finite"),
        # a kind without a sentence of its own: pydantic's, after the variable and its value
        "AEGAN_MAX_STEPS": ("9" * 5000, "9': Unable to parse input string as an integer, exceeded"),
    }
    for name, (value, says) in said.items():
        with pytest.raises(SettingsError) as caught:
            read_environment({name: value})
        assert says in str(caught.value)


def test_a_storage_url_password_is_never_shown_but_other_values_are():
    with pytest.raises(SettingsError) as caught:
        read_environment({"AEGAN_RATE_LIMIT_STORAGE": "redis://:hunter2@cache:port/0"})
    assert "'redis://:***@cache:port/0' is not a URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(SettingsError) as caught:  # no password to hide: not shown as one
        read_environment({"AEGAN_RATE_LIMIT_STORAGE": "redis://:@cache:port/0"})
    assert "'redis://:@cache:port/0' is not a URL" in str(caught.value)
    with pytest.raises(SettingsError) as caught:  # only the storage URL is redacted
        read_environment({"AEGAN_DEVICE": "//user:word@host"})
    assert "AEGAN_DEVICE='//user:word@host' must be one of" in str(caught.value)


def test_values_are_read_as_an_operator_writes_them():
    env = read_environment(
        {
            "AEGAN_MAX_N": " 1_000 ",
            "AEGAN_DEVICE": "CPU",
            "AEGAN_CUDA_ALGO_SEARCH": "exhaustive",
            "AEGAN_THREADS": "",  # empty: unset
            "AEGAN_FP16": "0",
            "AEGAN_QUOTA_IMAGES_PER_S": "2.5",
            "UNRELATED": "x",
        }
    )
    assert (env.max_n, env.device, env.cuda_algo_search) == (1000, "cpu", "EXHAUSTIVE")
    assert env.threads is None and env.fp16 is False and env.quota_images_per_s == 2.5


def test_the_process_environment_is_read_by_default(monkeypatch):
    monkeypatch.setenv("AEGAN_MAX_STEPS", "9")
    monkeypatch.setenv("AEGAN_DEVICE", "cpu")
    assert read_environment().max_steps == 9
    assert Settings.from_env().limits.max_steps == 9
    monkeypatch.setenv("AEGAN_MAX_STEPS", "1")
    with pytest.raises(SettingsError, match="AEGAN_MAX_STEPS=1 must be at least 2"):
        Settings.from_env()


def test_checks_beyond_one_bound_name_the_variables():
    with pytest.raises(SettingsError, match="STORAGE='redis://cache:port' is not a URL: Port"):
        read_environment({"AEGAN_RATE_LIMIT_STORAGE": "redis://cache:port"})
    with pytest.raises(SettingsError, match="BYTES=10 must be at least AEGAN_MAX_REQUEST_BYTES"):
        Settings.from_env({"AEGAN_MAX_INFLIGHT_BYTES": "10", "AEGAN_MAX_REQUEST_BYTES": "11"})
    # exactly one request in flight is enough
    same = Settings.from_env({"AEGAN_MAX_INFLIGHT_BYTES": "11", "AEGAN_MAX_REQUEST_BYTES": "11"})
    assert same.limits.max_inflight_bytes == same.limits.max_request_bytes == 11


def test_choices_are_read_without_the_spaces_around_them():
    env = read_environment(
        {
            "AEGAN_DEVICE": " CPU ",
            "AEGAN_CUDA_ALGO_SEARCH": " default ",
            "AEGAN_CUDA_ARENA": " kNextPowerOfTwo ",
            "AEGAN_RATE_LIMIT_FAILURE": " Closed ",
        }
    )
    assert (env.device, env.cuda_algo_search) == ("cpu", "DEFAULT")
    assert (env.cuda_arena, env.rate_limit_failure) == ("kNextPowerOfTwo", "closed")


@pytest.mark.parametrize(
    "field", ["device", "cuda_algo_search", "cuda_arena", "rate_limit_failure"]
)
def test_a_choice_given_as_other_than_text_is_refused_as_a_validation_error(field):
    with pytest.raises(ValidationError, match=field):
        Environment.model_validate({field: 1})


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "redis://cache:6379",  # no database: the default one
        "redis://cache:6379/2",
        "rediss://:secret@cache:6380/15",
        "redis+unix:///run/redis/redis.sock",  # a socket: a path, no host
    ],
)
def test_usable_storage_urls_are_accepted_as_written(url):
    assert read_environment({"AEGAN_RATE_LIMIT_STORAGE": url}).rate_limit_storage == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://", "'redis://' names no Redis host"),
        ("rediss://", "'rediss://' names no Redis host"),
        ("redis://cache/X1", "the database 'X1' must be a number"),
        ("redis://cache:6379/2X", "the database '2X' must be a number"),
        ("rediss://cache:6380/quotas", "the database 'quotas' must be a number"),
    ],
)
def test_unusable_storage_urls_are_refused_saying_why(url, says):
    with pytest.raises(SettingsError) as caught:
        read_environment({"AEGAN_RATE_LIMIT_STORAGE": url})
    assert str(caught.value).endswith(says)


def test_the_wrong_variables_are_listed_one_after_another():
    with pytest.raises(SettingsError) as caught:
        read_environment({"AEGAN_MAX_N": "x", "AEGAN_FP16": "y"})
    assert str(caught.value) == "AEGAN_FP16='y' must be 0 or 1; AEGAN_MAX_N='x' is not an integer"
