"""api/deadline.py: a response not started within the deadline is a 503 with Retry-After (a Redis that
hangs must not hold callers for the socket timeouts); one that has started is never cut."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import Receive, Scope, Send

from sluicegate.api.deadline import ResponseDeadline


async def call(app: Any) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

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
