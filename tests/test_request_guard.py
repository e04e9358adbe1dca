"""The request guard on the ASGI middleware directly: its budget of request-body bytes held at
once by one worker (excess load refused with 429 and Retry-After before its body is read, the
budget given back when a request ends; an app that holds its requests), bodies streamed in pieces
of any size read whole, and error answers left in one shape, ``{"error": message}``."""

from __future__ import annotations

import asyncio
import json

import pytest
from bentoml.exceptions import BentoMLException

from aegan_serve.middleware import MAX_PARTS, MAX_TEXT_PART_BYTES, RequestGuard

KIB = 1024


class HoldingApp:
    """Reads the whole body, then waits for ``release`` before it answers 200."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        while True:
            message = await receive()
            if not message.get("more_body", False):
                break
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def request(
    length: int | None,
    chunks: list[bytes],
    content_type: bytes = b"application/json",
    path: str = "/decode",
):
    headers = [(b"content-type", content_type)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "path": path, "headers": headers}
    pending = list(chunks)

    async def receive():
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    return scope, receive, send, sent


def guard(app, limit: int = 1024 * KIB) -> RequestGuard:
    return RequestGuard(
        app,
        max_bytes=limit,
        max_json_bytes=limit,
        max_inflight_bytes=limit,
        routes={"/decode": (), "/encode": ("images",)},
    )


def test_announced_bodies_over_the_budget_are_refused_before_they_are_read():
    app = HoldingApp()
    middleware = guard(app)

    async def main():
        first = request(700 * KIB, [b"x" * (700 * KIB)])
        held = asyncio.ensure_future(middleware(*first[:3]))
        await asyncio.sleep(0.01)
        assert middleware.inflight_bytes == 700 * KIB
        second = request(400 * KIB, [b"x" * (400 * KIB)])
        await middleware(*second[:3])  # 700 + 400 KiB > 1 MiB: refused at once
        start = second[3][0]
        assert start["status"] == 429 and (b"retry-after", b"1") in start["headers"]
        assert b"AEGAN_MAX_INFLIGHT_BYTES" in second[3][1]["body"]
        assert app.calls == 1  # the refused request never reached the app
        third = request(300 * KIB, [b"x" * (300 * KIB)])  # 700 + 300 KiB fit
        fits = asyncio.ensure_future(middleware(*third[:3]))
        await asyncio.sleep(0.01)
        app.release.set()
        await asyncio.gather(held, fits)
        assert first[3][0]["status"] == third[3][0]["status"] == 200
        assert middleware.inflight_bytes == 0  # all given back

    asyncio.run(main())


def test_streamed_bodies_count_as_they_arrive():
    app = HoldingApp()
    middleware = guard(app)

    async def main():
        first = request(900 * KIB, [b"x" * (900 * KIB)])
        held = asyncio.ensure_future(middleware(*first[:3]))
        await asyncio.sleep(0.01)
        chunked = request(None, [b"x" * (64 * KIB)] * 4)  # no Content-Length: 256 KiB streamed
        with pytest.raises(BentoMLException, match="AEGAN_MAX_INFLIGHT_BYTES") as refused:
            await middleware(*chunked[:3])
        assert refused.value.error_code == 429  # BentoML answers it with this status
        assert middleware.inflight_bytes == 900 * KIB  # the refused stream gave its bytes back
        app.release.set()
        await held
        assert middleware.inflight_bytes == 0

    asyncio.run(main())


def test_bodies_of_exactly_the_limits_are_passed_on():
    """A body of exactly the request limit, which also fills the budget of bytes held at once,
    is passed on, announced or streamed."""
    app = HoldingApp()
    app.release.set()
    middleware = guard(app, limit=KIB)

    async def main():
        announced = request(KIB, [b"x" * KIB])
        await middleware(*announced[:3])
        streamed = request(None, [b"x" * (KIB // 2)] * 2)
        await middleware(*streamed[:3])
        return announced[3][0]["status"], streamed[3][0]["status"]

    assert asyncio.run(main()) == (200, 200)


def test_a_request_without_a_body_is_passed_on_while_the_budget_is_full():
    app = HoldingApp()
    middleware = guard(app, limit=KIB)

    async def main():
        full = request(KIB, [b"x" * KIB])
        held = asyncio.ensure_future(middleware(*full[:3]))
        await asyncio.sleep(0.01)
        empty = request(None, [])  # no Content-Length, no body
        waiting = asyncio.ensure_future(middleware(*empty[:3]))
        await asyncio.sleep(0.01)
        app.release.set()
        await asyncio.gather(held, waiting)
        assert full[3][0]["status"] == empty[3][0]["status"] == 200
        assert middleware.inflight_bytes == 0

    asyncio.run(main())


class RefusalHoldingApp:
    """Reads the whole body and answers 200; a refusal raised while it reads is answered (with
    its status) only after ``release``, as a server sends an error answer to a slow client."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        try:
            while (await receive()).get("more_body", False):
                pass
            status = 200
        except BentoMLException as refused:
            await self.release.wait()
            status = int(refused.error_code)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_an_announced_body_is_not_refused_for_the_load_of_others():
    """While another request's refusal for load is still being answered (the budget still over
    its limit), a request admitted before may send the body it announced."""
    app = RefusalHoldingApp()
    middleware = guard(app, limit=KIB)

    async def main():
        arrived = asyncio.Event()
        scope, _, send, sent = request(256, [])

        async def receive():
            await arrived.wait()  # a slow client: its announced body comes late
            return {"type": "http.request", "body": b"x" * 256, "more_body": False}

        slow = asyncio.ensure_future(middleware(scope, receive, send))
        await asyncio.sleep(0.01)
        streamed = request(None, [b"x" * 400] * 2)  # 256 + 800 bytes: over the budget
        refused = asyncio.ensure_future(middleware(*streamed[:3]))
        await asyncio.sleep(0.01)
        assert middleware.inflight_bytes > KIB  # the refusal is being answered
        arrived.set()
        await asyncio.sleep(0.01)
        app.release.set()
        await asyncio.gather(slow, refused)
        assert sent[0]["status"] == 200
        assert streamed[3][0]["status"] == 429
        assert middleware.inflight_bytes == 0

    asyncio.run(main())


def test_request_messages_without_a_body_count_as_empty():
    """ASGI lets a request message leave out its body: it counts as no bytes, so a body of
    exactly the limit around such messages is passed on."""
    app = HoldingApp()
    app.release.set()
    middleware = guard(app, limit=KIB)
    messages = [
        {"type": "http.request", "more_body": True},
        {"type": "http.request", "body": b"x" * KIB, "more_body": True},
        {"type": "http.request"},
    ]
    scope, _, send, sent = request(None, [])

    async def receive():
        return messages.pop(0)

    asyncio.run(middleware(scope, receive, send))
    assert sent[0]["status"] == 200


def test_a_url_encoded_field_name_split_across_messages_is_read_whole():
    """A server streams a body in several messages: a file field's name cut in two is still
    the file field, and refused."""
    app = HoldingApp()
    app.release.set()
    middleware = guard(app)
    form = b"application/x-www-form-urlencoded"

    async def main():
        split = request(None, [b"steps=3&ima", b"ges=abc"], form, "/encode")
        with pytest.raises(BentoMLException, match="'images' is a file") as refused:
            await middleware(*split[:3])
        assert refused.value.error_code == 400
        other = request(None, [b"steps=3&ima", b"gesx=abc"], form, "/encode")
        await middleware(*other[:3])  # another field: passed on to the app
        assert other[3][0]["status"] == 200
        longer = request(None, [b"steps=3&images", b"x=abc"], form, "/encode")
        await middleware(*longer[:3])  # "imagesx", cut where it reads "images": passed on
        assert longer[3][0]["status"] == 200

    asyncio.run(main())


class AnsweringApp:
    """Answers every request with ``status`` and ``body``, in two body messages."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        half = len(self.body) // 2
        await send({"type": "http.response.body", "body": self.body[:half], "more_body": True})
        await send({"type": "http.response.body", "body": self.body[half:]})


VALIDATION = {
    "error": "1 validation error for Input",
    "detail": [
        {"loc": ["body", "n"], "msg": "Input should be less than or equal to 64"},
        {"msg": "no place given"},
        {"loc": ["steps"]},
        "not an object",
    ],
}


@pytest.mark.parametrize(
    ("status", "body", "answer"),
    [
        (400, b'[{"error": "images[0] is empty"}]', {"error": "images[0] is empty"}),
        (
            422,
            json.dumps(VALIDATION).encode(),
            {
                **VALIDATION,
                "error": "body.n: Input should be less than or equal to 64; body: no place given; "
                "steps: ",
            },
        ),
        # not what BentoML sends: passed on as they are
        (400, b'[{"error": "a"}, {"error": "b"}]', [{"error": "a"}, {"error": "b"}]),
        (400, b"[]", []),
        (404, b'{"error": "no such thing"}', {"error": "no such thing"}),
        (405, b"Method Not Allowed", None),
    ],
)
def test_error_answers_are_put_in_one_shape(status, body, answer):
    middleware = guard(AnsweringApp(status, body))

    async def main():
        scope, receive, send, sent = request(2, [b"{}"])
        await middleware(scope, receive, send)
        return sent

    start, whole = asyncio.run(main())
    assert start["status"] == status
    expected = body if answer is None else json.dumps(answer).encode()
    assert whole["body"] == expected
    assert (b"content-length", str(len(expected)).encode()) in start["headers"]


class ScriptedApp:
    """Answers every request with ``status``, ``headers`` and the body messages given."""

    def __init__(self, status: int, headers: list, bodies: list[dict]) -> None:
        self.status, self.headers, self.bodies = status, headers, bodies

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        for message in self.bodies:
            await send({"type": "http.response.body", **message})


def answered(app) -> tuple[dict, list[dict]]:
    """The start message and the body messages the guard sends for ``app``'s answer."""

    async def main():
        scope, receive, send, sent = request(2, [b"{}"])
        await guard(app)(scope, receive, send)
        return sent

    start, *bodies = asyncio.run(main())
    return start, bodies


def test_an_error_body_in_pieces_goes_out_whole_with_one_true_content_length():
    # ASGI's body key is optional (an empty body), and the app's content-length counted the body
    # before the guard reshaped it
    pieces = [{"body": b'[{"error": ', "more_body": True}, {"more_body": True}, {"body": b'"x"}]'}]
    headers = [(b"content-type", b"application/json"), (b"content-length", b"16")]
    start, bodies = answered(ScriptedApp(400, headers, pieces))
    assert bodies == [{"type": "http.response.body", "body": b'{"error": "x"}'}]
    assert start["status"] == 400
    assert start["headers"] == [
        (b"content-type", b"application/json"),
        (b"content-length", b"14"),
    ]  # and no retry-after: only a 429 or a 503 asks the client to come back


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [
        (503, [], [b"1"]),
        (429, [], [b"1"]),
        (429, [(b"retry-after", b"7")], [b"7"]),  # the app's own is kept, not doubled
        (503, [(b"Retry-After", b"30")], [b"30"]),
        (504, [], []),
    ],
)
def test_a_busy_answer_tells_when_to_come_back_once(status, headers, retry_after):
    start, _ = answered(ScriptedApp(status, headers, [{"body": b'{"error": "busy"}'}]))
    assert start["status"] == status
    assert [v for k, v in start["headers"] if k.lower() == b"retry-after"] == retry_after


BOUNDARY = b"aegan-boundary"
MULTIPART = b"multipart/form-data; boundary=" + BOUNDARY


def multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A multipart/form-data body of (headers, content) parts."""
    body = b"".join(
        b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
        for headers, content in parts
    )
    return body + b"--" + BOUNDARY + b"--\r\n"


def text_part(name: bytes, content: bytes = b"1") -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="' + name + b'"', content


def in_pieces(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def passed_or_refused(chunks: list[bytes], path: str = "/decode") -> int | str:
    """The app's status if the guard passed the body on, or the guard's refusal."""
    app = HoldingApp()
    app.release.set()
    middleware = guard(app, limit=4 * 1024 * KIB)  # room for a whole text part

    async def main():
        scope, receive, send, sent = request(None, chunks, MULTIPART, path)
        await middleware(scope, receive, send)
        return sent[0]["status"]

    try:
        return asyncio.run(main())
    except BentoMLException as refused:
        return f"{int(refused.error_code)} {refused}"


def test_a_multipart_body_of_exactly_max_parts_is_passed_on():
    assert MAX_PARTS == 1000
    fields = [text_part(b"f%d" % i) for i in range(MAX_PARTS)]
    assert passed_or_refused([multipart(fields)]) == 200
    refused = passed_or_refused([multipart([*fields, text_part(b"one-more")])])
    assert refused == "400 multipart body has more than 1000 parts"


def test_multipart_headers_and_text_parts_split_across_messages_are_read_whole():
    """A server streams a body in pieces of any size: a part's headers cut anywhere are still
    read whole, and a text part over the limit is refused however it is cut."""
    named = multipart([text_part(b"steps"), (b"Content-Type: text/plain", b"1")])
    assert passed_or_refused(in_pieces(named, 1)) == (
        "400 a multipart part has no name in its Content-Disposition header"
    )
    file_as_text = multipart([text_part(b"images", b"abc")])
    assert passed_or_refused(in_pieces(file_as_text, 3), "/encode") == (
        "400 form field 'images' must be an uploaded file (a part with a filename, e.g. curl -F "
        "'images=@picture.png'), not text"
    )
    text = b'"' + b"a" * (MAX_TEXT_PART_BYTES - 2) + b'"'  # a JSON string of exactly the limit
    big = multipart([text_part(b"latents", text + b" ")])
    assert passed_or_refused(in_pieces(big, 64 * KIB)) == (
        f"413 a form field is larger than {MAX_TEXT_PART_BYTES} bytes"
    )
    whole = multipart([text_part(b"latents", text)])
    assert passed_or_refused(in_pieces(whole, 64 * KIB)) == 200
