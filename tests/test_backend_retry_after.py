"""The openai engine honours a backend's `Retry-After` before the first token.

vLLM, TGI and OpenAI-compatible proxies answer 429 or 503 with `Retry-After` when overloaded: coming
back sooner hammers the server and burns the tries. A raw asyncio server on a loopback port refuses the
first call(s) with such a header and then streams; it notes when each call arrived, as it saw it. The
engine's own backoff is a few milliseconds here, so any gap of a second is the header's doing. Only
lower bounds the fix guarantees, and generous upper bounds: the machine may be busy. No Redis.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import pytest

from sluicegate.sessions.runs import RunSpec
from sluicegate.workers.engines.base import EngineError, Finish
from sluicegate.workers.engines.openai import OpenAIEngine

pytestmark = pytest.mark.single_server  # no Redis: once is enough

WORDS = ["Sluice", " gates", " hold", " water", "."]
MESSAGES = [{"role": "user", "content": "what does a sluice gate do?"}]


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
          + b"".join(chunk({"content": w}) for w in WORDS) + chunk({}, "stop") + b"data: [DONE]\n\n")


def response(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close",
            **(headers or {})}
    lines = "".join(f"{name}: {value}\r\n" for name, value in head.items())
    return f"HTTP/1.1 {status} Busy\r\n{lines}\r\n".encode() + body


@dataclass
class Overloaded:
    """Refuses the first `refusals` calls to `path` with `status` and `Retry-After: retry_after()` (asked
    at the moment of answering: an HTTP-date is relative to then), then serves: a model listing on GET
    /models, a stream on POST /chat/completions. `arrivals`: when each call to `path` came (monotonic),
    `walls`: the same on the wall clock (an HTTP-date's)."""

    retry_after: Callable[[], str]
    status: int = 429
    refusals: int = 1
    path: bytes = b"/v1/chat/completions"
    arrivals: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # the Retry-After values sent

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            arrived, wall = time.monotonic(), time.time()
            method, target = head.split(b" ", 2)[:2]
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            if target == self.path:
                self.arrivals.append(arrived)
                self.walls.append(wall)
            if target == self.path and len(self.arrivals) <= self.refusals:
                value = self.retry_after()
                self.sent.append(value)
                message = {"error": {"message": "the server is overloaded", "code": self.status}}
                writer.write(response(self.status, json.dumps(message).encode(), {"Retry-After": value}))
            elif method == b"GET":
                writer.write(response(200, json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()))
            else:
                writer.write(STREAM)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def gap(self) -> float:
        """Seconds between the first call and the second, as the server saw them."""
        assert len(self.arrivals) >= 2, f"the engine never came back: {self.arrivals}"
        return self.arrivals[1] - self.arrivals[0]


def spec() -> RunSpec:
    return RunSpec(request_id="r1", attempt="1", session_id="s", group="default", tenant="t", priority=5,
                   max_tokens=16, start_index=0, input_kind="m", input_text=json.dumps(MESSAGES), params={})


async def run(backend: Overloaded, *, configured_model: bool = True, **engine_options: Any) -> list[Any]:
    """What the engine yields against `backend`: its own backoff a few milliseconds, 3 tries."""
    server = await asyncio.start_server(backend.answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", models={"*": "m"} if configured_model else None,
                          retries=3, backoff_initial=0.01, backoff_max=0.02, timeout=5.0, first_token_timeout=5.0,
                          idle_timeout=5.0, **engine_options)
    out: list[Any] = []
    try:
        async for piece in engine.stream(spec(), ""):
            out.append(piece)
    finally:
        await engine.aclose()
        server.close()
        await server.wait_closed()
    return out


def assert_complete(out: list[Any]) -> None:
    """Every token of the stream, then its finish."""
    assert out[:-1] == WORDS, out
    assert isinstance(out[-1], Finish) and out[-1].reason == "stop", out


@pytest.mark.parametrize(("status", "value"), [(429, "1"), (503, "1.0")], ids=["429-seconds", "503-decimal"])
def test_a_retry_waits_as_long_as_the_backend_asked(status: int, value: str) -> None:
    """`Retry-After: 1` on a 429 (or 1.0 on a 503): the second call comes no sooner than a second later,
    where the engine's own backoff (at most 20 ms here) brought it back at once, and the run is whole."""
    backend = Overloaded(lambda: value, status=status)
    out = asyncio.run(run(backend))
    assert backend.gap >= 0.95, backend.gap
    assert backend.gap < 5, backend.gap
    assert len(backend.arrivals) == 2
    assert_complete(out)


def test_an_http_date_retry_after_is_honoured_too() -> None:
    """The HTTP-date form (RFC 9110), 2 whole seconds ahead of the second the backend answers in: the
    retry comes no sooner than that date (less 0.1 s for its 1 s resolution), at least 0.9 s later."""
    target = 0.0

    def date() -> str:
        nonlocal target
        target = math.floor(time.time()) + 2
        return formatdate(target, usegmt=True)

    backend = Overloaded(date, status=503)
    out = asyncio.run(run(backend))
    assert backend.sent[0].endswith(" GMT"), backend.sent
    assert backend.walls[1] >= target - 0.1, (backend.walls, target)
    assert 0.9 <= backend.gap < 5, backend.gap
    assert_complete(out)


def test_a_huge_retry_after_is_capped() -> None:
    """`Retry-After: 100000` (a confused or hostile backend) waits the cap (0.3 s here; 30 s by default),
    not a day: the slot is not parked."""
    backend = Overloaded(lambda: "100000")
    out = asyncio.run(run(backend, retry_after_max=0.3))
    assert 0.25 <= backend.gap < 2, backend.gap
    assert_complete(out)


@pytest.mark.parametrize("value", ["soon", "-3", "Sun, 06 Nov 1994 08:49:37 GMT", ""],
                         ids=["garbage", "negative", "past-date", "empty"])
def test_a_retry_after_that_means_nothing_leaves_the_own_backoff(value: str) -> None:
    """A Retry-After that does not parse, is negative or already past is ignored: the engine's own
    backoff (milliseconds here) brings the retry back at once."""
    backend = Overloaded(lambda: value)
    out = asyncio.run(run(backend))
    assert backend.gap < 0.5, backend.gap
    assert_complete(out)


def test_a_model_listing_refused_with_retry_after_waits_too() -> None:
    """The model listing (`/models`, asked when no --backend-model is set, through aiohttp) is the
    other call before the first token: its 503's Retry-After is read from aiohttp's headers."""
    backend = Overloaded(lambda: "1", status=503, path=b"/v1/models")
    out = asyncio.run(run(backend, configured_model=False))
    assert backend.gap >= 0.95, backend.gap
    assert_complete(out)


def test_a_backend_that_keeps_refusing_ends_the_attempt_with_its_words() -> None:
    """Retry-After is a wait, not more tries: past the last try the attempt fails with the backend's
    message (and the waits it asked for, capped, were kept)."""
    backend = Overloaded(lambda: "100000", refusals=10)
    with pytest.raises(EngineError) as failed:
        asyncio.run(run(backend, retry_after_max=0.2))
    assert failed.value.transient and "the server is overloaded" in str(failed.value), failed.value
    assert len(backend.arrivals) == 3
    gaps = [b - a for a, b in zip(backend.arrivals, backend.arrivals[1:], strict=False)]
    assert all(0.15 <= gap < 2 for gap in gaps), gaps
