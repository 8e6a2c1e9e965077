"""Keep-alive pings follow the stream, not its session: a request queued behind a long generation in its
session gets the other request's batches, none of them for it, and still a ping every
`--sse-ping-seconds` (else proxies cut it as idle, and a streamed chat's status waits for its first token)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import pytest

from tests.helpers import Stack, call, fast_settings, submit

PING_SECONDS = 1.0


@pytest.fixture
def slow_stack(redis_url: str) -> Iterator[Stack]:
    """One worker at 20 tokens/s: a 100-token request generates for about 5 s."""
    running = Stack(fast_settings(redis_url, sim_tokens_per_second=20.0, sse_ping_seconds=PING_SECONDS))
    running.start(workers=1)
    yield running
    running.stop()


def connect(stack: Stack) -> http.client.HTTPConnection:
    host, port = stack.base_url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def status(stack: Stack, rid: str) -> str:
    code, body = call("GET", f"{stack.base_url}/v1/requests/{rid}")
    assert code == 200, body
    return body["status"]


def test_a_request_stream_behind_another_request_of_its_session_gets_pings(slow_stack: Stack) -> None:
    first = submit(slow_stack.base_url, "busy", max_tokens=100)
    second = submit(slow_stack.base_url, "busy", max_tokens=2)  # waits behind `first`
    conn = connect(slow_stack)
    try:
        conn.request("GET", f"/v1/requests/{second}/events")
        response = conn.getresponse()
        assert response.status == 200
        seen: list[str] = []  # "ping", or the events' names, in arrival order
        first_status_at_ping = None
        while "done" not in seen:
            line = response.readline().decode()
            assert line, f"the stream ended early: {seen}"
            if line.startswith(": ping"):
                if "ping" not in seen:
                    first_status_at_ping = status(slow_stack, first)
                seen.append("ping")
            elif line.startswith("event: "):
                seen.append(line.removeprefix("event: ").strip())
    finally:
        conn.close()
    assert "ping" in seen and seen.index("ping") < seen.index("started"), \
        f"no ping while the session's other request generated: {seen}"
    assert first_status_at_ping == "running", "the ping came only once the other request had ended"


def test_a_streamed_chat_behind_another_request_gets_its_status_from_a_ping(slow_stack: Stack) -> None:
    """api/openai_routes.py's first_news sends a streamed chat's status with its first token or first ping."""
    first = submit(slow_stack.base_url, "chat-busy", max_tokens=100)
    conn = connect(slow_stack)
    try:
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}),
                     {"content-type": "application/json", "X-Session-Id": "chat-busy"})
        response = conn.getresponse()
        assert response.status == 200
        assert status(slow_stack, first) == "running", "the status came only once the other request had ended"
        body = response.read().decode()
    finally:
        conn.close()
    assert "data: [DONE]" in body
    deadline = time.monotonic() + 20
    while status(slow_stack, first) != "done":  # let the stack stop cleanly
        assert time.monotonic() < deadline
        time.sleep(0.1)
