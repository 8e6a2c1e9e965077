"""api/deadline.py: a response not started within the deadline is a 503 with Retry-After (a Redis that
hangs must not hold callers for the socket timeouts); one that has started is never cut. A body that
keeps arriving is never cut either (the deadline counts from its end); one that stalls is a 408."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from sluicegate.api.deadline import ResponseDeadline
from tests.helpers import Stack, fast_settings, response_deadline
from tests.helpers import call as http_call


async def call(app: Any, parts: list[tuple[float, bytes]] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request; `parts` is its body as (seconds before it arrives, bytes), else no body."""
    sent: list[dict[str, Any]] = []
    body = list(parts or [(0.0, b"")])

    async def receive() -> dict[str, Any]:
        if not body:
            await asyncio.Event().wait()  # the client is still there, sending nothing more
        pause, chunk = body.pop(0)
        await asyncio.sleep(pause)
        return {"type": "http.request", "body": chunk, "more_body": bool(body)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def app_that(wait_before: float, stream_for: float = 0.0) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(wait_before)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(int(stream_for / 0.05)):
            await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": b".", "more_body": True})
        await send({"type": "http.response.body", "body": b"end"})

    return app


def test_a_response_not_started_in_time_is_a_503_with_retry_after() -> None:
    status, headers, body = asyncio.run(call(ResponseDeadline(app_that(1.0), seconds=0.2)))
    assert status == 503 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["type"] == "unavailable"


def test_a_started_response_runs_past_the_deadline() -> None:
    status, _, body = asyncio.run(call(ResponseDeadline(app_that(0.0, stream_for=0.5), seconds=0.2)))
    assert status == 200 and body.endswith(b"end") and body.count(b".") == 10


def test_a_response_starting_as_the_deadline_fires_is_one_answer_never_a_500() -> None:
    """Started at about the moment the deadline fires: either answer is fine, an error is not."""
    for wait in (0.195, 0.199, 0.2, 0.201, 0.205):
        status, _, _ = asyncio.run(call(ResponseDeadline(app_that(wait), seconds=0.2)))
        assert status in (200, 503)


def test_an_app_that_swallows_the_cancel_still_answers_never_a_500() -> None:
    """Something under the app (a client library) swallowed the deadline's cancel, then the response
    starts: the fired timeout cannot be rescheduled; the answer goes on (it was a RuntimeError)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    status, _, body = asyncio.run(call(ResponseDeadline(app, seconds=0.1)))
    assert status == 200 and body == b"late"


def app_reading_the_body(work_after: float = 0.0) -> Any:
    """Reads the whole body, works `work_after` s (a Redis round trip), then echoes the body."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        await asyncio.sleep(work_after)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


def test_a_body_that_keeps_arriving_is_never_cut() -> None:
    """Six parts 0.1 s apart: 0.6 s of upload against a 0.3 s deadline (a large prompt on a slow link)."""
    parts = [(0.1, b"%d" % i) for i in range(6)]
    status, _, body = asyncio.run(call(ResponseDeadline(app_reading_the_body(), seconds=0.3), parts))
    assert status == 200 and body == b"012345"


def test_the_response_deadline_counts_from_the_end_of_the_body() -> None:
    """The body ends at 0.25 s of a 0.3 s deadline: the answer has 0.3 s from there, and no more."""
    parts = [(0.05, b"a"), (0.1, b"b"), (0.1, b"c")]
    status, _, body = asyncio.run(call(ResponseDeadline(app_reading_the_body(work_after=0.2), seconds=0.3), parts))
    assert status == 200 and body == b"abc"
    status, headers, body = asyncio.run(call(ResponseDeadline(app_reading_the_body(work_after=0.5), seconds=0.3),
                                             parts))
    assert status == 503 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["type"] == "unavailable"


@pytest.mark.parametrize("parts", [[(0.0, b"a"), (0.5, b"b")], [(0.5, b"a")]], ids=["mid-body", "before-any-byte"])
def test_a_stalled_body_is_a_408_that_names_the_body_not_a_503(parts: list[tuple[float, bytes]]) -> None:
    started = time.monotonic()
    status, headers, body = asyncio.run(call(ResponseDeadline(app_reading_the_body(), seconds=0.2), parts))
    assert status == 408 and headers["connection"] == "close" and "retry-after" not in headers
    error = json.loads(body)["error"]
    assert error["type"] == "request_timeout" and "body" in error["message"] and "queue store" not in error["message"]
    assert time.monotonic() - started < 0.45  # ended at the stall, not when the body would have come


# ---- a real server (real Valkey): the submit and chat routes, through the hot path ----------------------
@pytest.fixture
def short_deadline_stack(redis_url: str) -> Iterator[Stack]:
    """A stack whose response deadline is 1 s (the default 5 s would make these tests slow)."""
    with response_deadline(1.0):
        running = Stack(fast_settings(redis_url, sim_tokens_per_second=4000.0)).start(workers=1)
        try:
            yield running
        finally:
            running.stop()


def slow_post(stack: Stack, path: str, body: bytes, parts: int, pause: float,
              stall_after: int | None = None) -> tuple[int, dict[str, str], Any, bytes]:
    """POST `body` in `parts` pieces, `pause` s apart (stopping after `stall_after` of them: the client
    stalls); the status, headers, JSON body, and what the connection says after the answer."""
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    try:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body)))
        size = -(-len(body) // parts)
        for i in range(parts if stall_after is None else stall_after):
            sock.sendall(body[i * size:(i + 1) * size])
            time.sleep(pause)
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        answer = json.loads(response.read())
        headers = {k.lower(): v for k, v in response.getheaders()}
        sock.settimeout(2)
        after = None  # still open (a keep-alive connection)
        with contextlib.suppress(TimeoutError):
            after = sock.recv(100)  # b"": the server closed the connection
        return response.status, headers, answer, after
    finally:
        sock.close()


def test_a_slow_upload_is_accepted_on_a_real_server(short_deadline_stack: Stack) -> None:
    """About 2.4 s of upload against a 1 s deadline, on the submit route and the chat route (the hot path)."""
    stack = short_deadline_stack
    submit = json.dumps({"prompt": "x" * 600, "max_tokens": 2}).encode()
    status, _, answer, _ = slow_post(stack, "/v1/sessions/slow1/requests", submit, parts=6, pause=0.4)
    assert status == 202, answer
    assert http_call("GET", f"{stack.base_url}/v1/requests/{answer['request_id']}")[0] == 200
    chat = json.dumps({"messages": [{"role": "user", "content": "x" * 600}], "max_tokens": 2}).encode()
    status, _, answer, _ = slow_post(stack, "/v1/chat/completions", chat, parts=6, pause=0.4)
    assert status == 200 and answer["choices"][0]["message"]["content"], answer


@pytest.mark.parametrize("path", ["/v1/sessions/stalled/requests", "/v1/chat/completions"])
def test_a_stalled_upload_is_a_408_and_stores_nothing_on_a_real_server(short_deadline_stack: Stack,
                                                                       path: str) -> None:
    stack = short_deadline_stack
    body = json.dumps({"prompt": "x" * 600, "messages": [{"role": "user", "content": "x"}]}).encode()
    started = time.monotonic()
    status, headers, answer, after = slow_post(stack, path, body, parts=4, pause=0.0, stall_after=2)
    assert status == 408 and answer["error"]["type"] == "request_timeout", answer
    assert "body" in answer["error"]["message"] and headers["connection"] == "close" and after == b""
    assert time.monotonic() - started < 3
    assert http_call("GET", f"{stack.base_url}/v1/sessions/stalled/events")[0] == 404  # nothing stored
