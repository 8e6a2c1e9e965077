"""The openai engine against exact backend bytes: how servers really shape their streams.

A raw asyncio server answers each POST with the bytes a test gives (no framework re-encodes them), so
a stream can be what llama.cpp's server sends: message diffs, several chunks for one token, an
`error: {...}` line. The engine runs in-process; no Redis is needed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from sluicegate.sessions.runs import RunSpec
from sluicegate.workers.engines.base import EngineError, Finish, Token
from sluicegate.workers.engines.openai import RUNAWAY_CHUNKS_PER_TOKEN, RUNAWAY_SLACK, OpenAIEngine
from tests.openai_helpers import read_posted_json

SSE_200 = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
DONE = b"data: [DONE]\n\n"
MESSAGES = [{"role": "user", "content": "weather in Paris?"}]


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, *, usage: dict[str, int] | None = None,
          choices: bool = True) -> bytes:
    """One `chat.completion.chunk` event, as an OpenAI-compatible server sends it."""
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices
                            else []}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage(completion: int) -> bytes:
    return chunk(choices=False, usage={"prompt_tokens": 9, "completion_tokens": completion,
                                       "total_tokens": 9 + completion})


def tool_call(**fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": 0, **fields}]}


# llama.cpp's server streams message diffs: 4 generated tokens ("Let", " me check.", the tool call's
# name, its arguments) come as 6 chunks, the text's end and the tool call's start from one token, and
# the arguments in three pieces. It stops by itself (tool_calls) inside max_tokens=5.
DIFFS = [
    chunk({"role": "assistant", "content": None}),
    chunk({"content": "Let"}),
    chunk({"content": " me check."}),
    chunk(tool_call(id="call_1", type="function", function={"name": "get_weather", "arguments": ""})),
    chunk(tool_call(function={"arguments": "{\"city\""})),
    chunk(tool_call(function={"arguments": ": \"Par"})),
    chunk(tool_call(function={"arguments": "is\"}"})),
    chunk({}, "tool_calls"),
    usage(4),
    DONE,
]


@dataclass
class RawBackend:
    """Answers every POST with `head` then `pieces`, each flushed on its own; records the request bodies."""

    pieces: list[bytes]
    head: bytes = SSE_200
    bodies: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0  # pieces written before the client went away (or all of them)

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.bodies.append(await read_posted_json(reader))
            writer.write(self.head)
            self.written = 0
            for piece in self.pieces:
                writer.write(piece)
                await writer.drain()
                self.written += 1
                await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def spec(max_tokens: int, start_index: int = 0) -> RunSpec:
    return RunSpec(request_id="r1", attempt="1", session_id="s", group="default", tenant="t", priority=5,
                   max_tokens=max_tokens, start_index=start_index, input_kind="m", input_text=json.dumps(MESSAGES),
                   params={})


async def stream(backend: RawBackend, run: RunSpec, so_far: str = "", *, continues: bool = True,
                 retries: int = 1) -> tuple[list[Any], EngineError | None]:
    """What the engine yields for `run` against `backend`, and the EngineError it raised, if any."""
    out, error, _ = await stream_engine(backend, run, so_far, continues=continues, retries=retries)
    return out, error


async def stream_engine(backend: RawBackend, run: RunSpec, so_far: str = "", *, continues: bool = True,
                        retries: int = 1) -> tuple[list[Any], EngineError | None, OpenAIEngine]:
    """As `stream`, and the engine (what it learnt from the backend's answers)."""
    server = await asyncio.start_server(backend.answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", models={"*": "m"}, retries=retries, backoff_initial=0.01,
                          backoff_max=0.02, timeout=5.0, first_token_timeout=5.0, idle_timeout=5.0)
    engine.resume_by(continues)
    out: list[Any] = []
    error: EngineError | None = None
    try:
        async for piece in engine.stream(run, so_far):
            out.append(piece)
    except EngineError as e:
        error = e
    finally:
        await engine.aclose()
        server.close()
        await server.wait_closed()
    return out, error, engine


def finish_of(pieces: list[Any]) -> Finish:
    found = [p for p in pieces if isinstance(p, Finish)]
    assert len(found) == 1 and pieces[-1] is found[0], pieces
    return found[0]


def arguments_of(pieces: list[Any]) -> str:
    return "".join(call["function"].get("arguments", "") for p in pieces if isinstance(p, Token) and p.delta
                   for call in p.delta.get("tool_calls", ()))


def test_a_backend_that_ends_by_itself_keeps_every_chunk_and_its_finish_reason() -> None:
    """More chunks than max_tokens, fewer tokens: the backend's own end. Counting chunks as tokens cut
    the tool call's arguments (invalid JSON) and said `length`."""
    out, error = asyncio.run(stream(RawBackend(DIFFS), spec(max_tokens=5)))
    assert error is None, error
    assert [p if isinstance(p, str) else p.text for p in out[:2]] == ["Let", " me check."]
    assert json.loads(arguments_of(out)) == {"city": "Paris"}
    assert len(out) == 7 and finish_of(out).reason == "tool_calls"
    assert finish_of(out).usage == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


@pytest.mark.parametrize("continues", [False, True], ids=["regenerate", "continue"])
def test_a_resume_counts_chunks_as_the_first_attempt_wrote_them(continues: bool) -> None:
    """A first attempt wrote 2 chunks (indices 0 and 1), then was preempted. Regenerating, the backend
    sends all 6 chunks again: the first 2 are skipped and the other 4 are indices 2-5, up to the backend's
    own end. Continuing, it is asked for max_tokens less the 2 and sends the rest (4 chunks for its 3
    tokens). Either way the rest is whole and the finish_reason the backend's."""
    so_far = "Let me check."
    rest = DIFFS[3:] if continues else DIFFS
    backend = RawBackend(rest)
    out, error = asyncio.run(stream(backend, spec(max_tokens=5, start_index=2), so_far, continues=continues))
    assert error is None, error
    assert backend.bodies[0]["max_tokens"] == (3 if continues else 5)
    assert len(out) == 5 and all(isinstance(p, Token) and p.delta for p in out[:4]), out
    assert json.loads(arguments_of(out)) == {"city": "Paris"}
    assert finish_of(out).reason == "tool_calls"


def test_a_backend_past_its_max_tokens_is_cut_and_ends_at_length() -> None:
    """A backend that ignores max_tokens: every chunk it sends within a generous bound reaches the
    caller, then Sluicegate closes the stream and the run ends `length` (never the backend's words)."""
    endless = [chunk({"role": "assistant", "content": ""}), *[chunk({"content": f"w{i} "}) for i in range(500)]]
    backend = RawBackend(endless)
    out, error = asyncio.run(stream(backend, spec(max_tokens=5)))
    assert error is None, error
    assert len(out) == 5 * RUNAWAY_CHUNKS_PER_TOKEN + RUNAWAY_SLACK + 1
    assert out[:-1] == [f"w{i} " for i in range(len(out) - 1)] and finish_of(out).reason == "length"
    assert backend.written < len(endless)  # the stream was closed, not read to its end


def test_a_backend_whose_own_count_passes_max_tokens_is_cut_there() -> None:
    """A server that reports usage in every chunk says itself when it went past max_tokens: cut there."""
    counted = [chunk({"content": f"w{i} "}, usage={"prompt_tokens": 9, "completion_tokens": i + 1,
                                                   "total_tokens": 10 + i}) for i in range(50)]
    out, error = asyncio.run(stream(RawBackend(counted), spec(max_tokens=3)))
    assert error is None, error
    assert out[:-1] == ["w0 ", "w1 ", "w2 "] and finish_of(out).reason == "length"


PERMANENT_ERRORS = {
    # llama.cpp's server: server_sent_event(sink, "error", ...), the payload unwrapped, then the stream ends
    "llama.cpp": b'error: {"code":400,"message":"the request exceeds the available context size, try increasing it",'
                 b'"type":"exceed_context_size_error"}\n\n',
    # another server's SSE error event, its data unwrapped
    "event-error": b'event: error\ndata: {"code":400,"message":"the request exceeds the available context size",'
                   b'"type":"invalid_request_error"}\n\n',
    "event-error-crlf": b'event:error\r\ndata:{"code":"400","message":"the request exceeds the available context '
                        b'size"}\r\n\r\n',
    # vLLM: an error chunk, wrapped
    "vllm": b'data: {"error":{"object":"error","message":"the request exceeds the available context size",'
            b'"type":"BadRequestError","param":null,"code":400}}\n\n',
}


@pytest.mark.parametrize("body", PERMANENT_ERRORS.values(), ids=PERMANENT_ERRORS.keys())
def test_an_error_the_backend_reports_in_its_stream_is_its_own_permanent_failure(body: bytes) -> None:
    """A 4xx the backend reports inside a 200 stream is the request's fault: its words, no retry. Skipping
    every line but `data:` made it look like a cut stream, retried (all `retries`, then --max-attempts)."""
    backend = RawBackend([body])
    out, error = asyncio.run(stream(backend, spec(max_tokens=5), retries=3))
    assert out == [] and error is not None
    assert "HTTP 400: the request exceeds the available context size" in str(error), str(error)
    assert error.transient is False and len(backend.bodies) == 1


def test_a_5xx_error_line_is_transient_and_retried_with_the_backends_words() -> None:
    backend = RawBackend([b'error: {"code":503,"message":"Loading model","type":"unavailable_error"}\n\n'])
    out, error = asyncio.run(stream(backend, spec(max_tokens=5), retries=3))
    assert out == [] and error is not None and error.transient is True
    assert "last error: HTTP 503: Loading model" in str(error) and len(backend.bodies) == 3


def test_an_error_line_after_tokens_ends_the_stream_with_the_backends_words() -> None:
    pieces = [chunk({"role": "assistant", "content": "Hi"}), b'error: {"code":500,"message":"decode failed"}\n\n']
    out, error = asyncio.run(stream(RawBackend(pieces), spec(max_tokens=5)))
    assert out == ["Hi"] and error is not None and error.transient is True
    assert "after 1 tokens" in str(error) and "HTTP 500: decode failed" in str(error), str(error)


def test_other_named_events_are_read_as_chunks() -> None:
    """Only `event: error` makes its data an error: another event name, and the event after an error's
    blank line, are chunks as usual."""
    pieces = [b"event: message\n" + chunk({"content": "Hi"}), b"event: error\n\n",
              chunk({"content": "!"}, "stop"), DONE]
    out, error = asyncio.run(stream(RawBackend(pieces), spec(max_tokens=5)))
    assert error is None, error
    assert out[:-1] == ["Hi", "!"] and finish_of(out).reason == "stop"
