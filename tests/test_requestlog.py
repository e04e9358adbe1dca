"""The log filters of aegan_serve/requestlog.py on hand-made records: BentoML's traceback and access
line of a 4xx answer are dropped (the gate writes one line instead), a 5xx and a 2xx keep theirs;
the one line of a refused request cannot carry a client's newline or an unbounded field."""

from __future__ import annotations

import logging

import pytest
from bentoml.exceptions import BentoMLException, InvalidArgument
from pydantic import BaseModel, ValidationError

from aegan_serve import requestlog
from aegan_serve.requestlog import (
    MAX_FIELD_CHARS,
    AccessLineFilter,
    ClientErrorFilter,
    install_filters,
    is_client_error,
    log_refused,
)


def access_record(args: object) -> logging.LogRecord:
    return logging.LogRecord("bentoml.access", logging.INFO, __file__, 1, "%s (%s) (%s) %.3fms",
                             args, None)  # fmt: skip


@pytest.mark.parametrize(
    ("response", "kept"),
    [
        ("status=404,type=application/json,length=40", False),
        ("status=400,type=application/json,length=40", False),
        ("status=429,type=application/json,length=40", False),
        ("status=200,type=image/png,length=900", True),
        ("status=500,type=application/json,length=40", True),
        ("status=503,type=application/json,length=40", True),
    ],
)
def test_the_access_line_of_a_4xx_is_dropped(response, kept):
    args = ("127.0.0.1:5000", "scheme=http,method=POST,path=/x", response, 1.5)
    assert AccessLineFilter().filter(access_record(args)) is kept


@pytest.mark.parametrize(
    "args",
    [
        ("127.0.0.1", "request", "status=404"),  # not the access line's four fields
        ["127.0.0.1", "request", "status=404", 1.0],  # not a tuple
        None,
    ],
)
def test_other_records_of_the_access_logger_are_kept(args):
    record = logging.LogRecord("bentoml.access", logging.INFO, __file__, 1, "msg", None, None)
    record.args = args
    assert AccessLineFilter().filter(record) is True


class _Model(BaseModel):
    n: int


def _validation_error() -> ValidationError:
    try:
        _Model.model_validate({"n": "many"})
    except ValidationError as exc:
        return exc
    raise AssertionError("no error")


@pytest.mark.parametrize(
    ("exc", "client"),
    [
        (InvalidArgument("bad field"), True),  # BentoML's 400
        (BentoMLException("too many", error_code=429), True),
        (_validation_error(), True),
        (BentoMLException("broken"), False),  # 500
        (BentoMLException("unavailable", error_code=503), False),
        (RuntimeError("bug"), False),
        (None, False),
    ],
)
def test_client_errors_are_the_4xx_answers(exc, client):
    assert is_client_error(exc) is client
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, None)
    record.exc_info = (type(exc), exc, None) if exc is not None else None
    assert ClientErrorFilter().filter(record) is (not client)


def test_a_record_logged_inside_except_resolves_the_exception_then():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, None)
    record.exc_info = True  # type: ignore[assignment]  # as logger.exception leaves it at times
    try:
        raise InvalidArgument("bad")
    except InvalidArgument:
        assert ClientErrorFilter().filter(record) is False
    try:
        raise RuntimeError("bug")
    except RuntimeError:
        assert ClientErrorFilter().filter(record) is True


def test_the_refused_line_is_one_bounded_line(caplog):
    caplog.set_level(logging.INFO, logger=requestlog.logger.name)
    log_refused("POST", "/encode\nFAKE 200", 413, "x" * 1000, None, "10.0.0.1")
    log_refused("GET", "/info", 401, "no key", "alice", "10.0.0.2")
    log_refused("GET", "/" + "p" * (MAX_FIELD_CHARS - 1), 404, "r" * MAX_FIELD_CHARS, None, "-")
    first, second, third = (r.getMessage() for r in caplog.records)
    assert "\n" not in first and "FAKE 200" in first and "\\n" in first
    assert first.startswith("POST /encode\\nFAKE 200 413 key=- client=10.0.0.1: ")
    assert first.endswith(": " + "x" * MAX_FIELD_CHARS + "...")  # cut at the limit
    assert second == "GET /info 401 key=alice client=10.0.0.2: no key"
    path, reason = "/" + "p" * (MAX_FIELD_CHARS - 1), "r" * MAX_FIELD_CHARS
    assert third == f"GET {path} 404 key=- client=-: {reason}"  # at the limit: whole


def test_filters_are_installed_once():
    install_filters()
    install_filters()
    for name, kind in (
        (requestlog.HTTP_APP_LOGGER, ClientErrorFilter),
        (requestlog.ACCESS_LOGGER, AccessLineFilter),
    ):
        assert sum(isinstance(f, kind) for f in logging.getLogger(name).filters) == 1
