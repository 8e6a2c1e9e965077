"""The openai engine against answers that say less (or other) than they seem to, served as exact bytes
(tests/test_openai_engine_streams.py's RawBackend): a validation 400 that echoes the whole request, a
stream that breaks after its finish_reason, a 200 that is not an event stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sluicegate.workers.engines.base import EngineError
from sluicegate.workers.engines.openai import OpenAIEngine
from tests.test_openai_engine_streams import RawBackend, chunk, finish_of, spec, stream_engine, tool_call


def answer(status: str, body: bytes, kind: bytes = b"application/json") -> bytes:
    """A response head (read to the connection's end) for RawBackend.head, and its body as one piece."""
    return b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + kind + b"\r\nconnection: close\r\n\r\n" + body


async def run_engine(backend: RawBackend, retries: int = 1) -> tuple[list[Any], EngineError | None, OpenAIEngine]:
    """What the engine yields for a 5-token run, the EngineError it raised, and the engine (what it learnt)."""
    return await stream_engine(backend, spec(max_tokens=5), retries=retries)


def test_a_bad_request_that_echoes_every_field_changes_nothing_for_the_next_ones() -> None:
    """vLLM's validation 400 quotes the request ('input'), `priority` and `stream_options` included: they were
    taken as refused and never sent again, for every tenant. Retried without them and refused again, the
    request fails with its own error, and the engine learns nothing."""
    echoed = {"error": {"message": "When using `tool_choice`, `tools` must be set. {'input': {'priority': 4, "
                                   "'stream_options': {'include_usage': True}}}", "code": 400}}
    backend = RawBackend([], head=answer("400 Bad Request", json.dumps(echoed).encode()))
    out, error, engine = asyncio.run(run_engine(backend))
    assert out == [] and error is not None and error.transient is False
    assert "`tools` must be set" in str(error), str(error)
    assert engine.send_priority is True and engine.ask_usage is True


def test_a_context_too_long_that_names_both_budgets_keeps_max_tokens() -> None:
    """vLLM's context-too-long 400 names `max_completion_tokens` too: the budget's name was switched for good."""
    words = "'max_tokens' or 'max_completion_tokens' is too large: 300. This model's maximum context length is 100"
    backend = RawBackend([], head=answer("400 Bad Request", json.dumps({"object": "error", "message": words,
                                                                        "code": 400}).encode()))
    out, error, engine = asyncio.run(run_engine(backend))
    assert error is not None and error.transient is False and "maximum context length" in str(error)
    assert len(backend.bodies) == 2 and "max_completion_tokens" in backend.bodies[1]  # tried renamed, once
    assert engine.capabilities.budget_field == "max_tokens"


@pytest.mark.parametrize(("pieces", "tokens", "reason"), [
    ([chunk({"content": "Hello"}), chunk({"content": " world"}, "stop")], 2, "stop"),
    ([chunk(tool_call(id="c1", type="function", function={"name": "f", "arguments": "{}"})),
      chunk({}, "tool_calls")], 1, "tool_calls")])
def test_a_stream_cut_after_its_finish_reason_ends_finished(pieces: list[bytes], tokens: int, reason: str) -> None:
    """The usage chunk and [DONE] never came: the run was resumed (text appended to a finished answer, a
    whole tool call turned into a failure). The generation had ended: it ends so."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100000\r\n\r\n"  # cut short
    out, error, _ = asyncio.run(run_engine(RawBackend(pieces, head=head)))
    assert error is None, error
    assert len(out) == tokens + 1 and finish_of(out).reason == reason


@pytest.mark.parametrize(("body", "kind", "words", "transient"), [
    (b'{"error": {"message": "model not loaded: out of memory", "code": 400}}', b"application/json",
     "HTTP 400: model not loaded", False),
    (b'{"error": {"message": "engine dead", "code": 503}}', b"application/json; charset=utf-8",
     "HTTP 503: engine dead", True),
    (b"<html><body>Welcome to nginx!</body></html>", b"text/html", "HTTP 200: <html><body>Welcome to nginx!", False)])
def test_a_200_that_is_not_an_event_stream_is_the_backends_words(body: bytes, kind: bytes, words: str,
                                                                  transient: bool) -> None:
    """Read as a stream it was "the stream ended before [DONE]", retried, the backend's words lost."""
    backend = RawBackend([], head=answer("200 OK", body, kind))
    out, error, _ = asyncio.run(run_engine(backend, retries=2))
    assert out == [] and error is not None and words in str(error), str(error)
    assert error.transient is transient
    assert len(backend.bodies) == (2 if transient else 1)
