"""The scripted fake backend (tests/fake_backend.py), exercised directly with httpx and the openai SDK."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fake_backend import FakeBackend, Script
from tests.openai_helpers import ServerThread, chat_stream

MESSAGES = [{"role": "user", "content": "weather in Paris?"}]
TOOL_DELTAS = [
    {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": ""}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\""}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": ": \"Paris\"}"}}]},
    {"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                     "function": {"name": "get_time", "arguments": "{}"}}]},
]


def lp(token: str, logprob: float) -> dict[str, Any]:
    return {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}]}


@pytest.fixture
def fake() -> Iterator[tuple[FakeBackend, ServerThread]]:
    backend = FakeBackend(models=["m1", "m2"], default=Script.text("Hel", "lo", " there"))
    with backend.serve() as server:
        yield backend, server


def sdk(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=10)


def base(server: ServerThread) -> str:
    return server.url.removesuffix("/v1")


def test_models_and_default_stream(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    assert [m.id for m in sdk(server).models.list()] == ["m1", "m2"]
    result = chat_stream(base(server), {"model": "m2", "messages": MESSAGES})
    assert result.status == 200 and result.headers["content-type"].startswith("text/event-stream") and result.done
    assert [c["choices"][0]["delta"] for c in result.content_chunks] == [
        {"role": "assistant", "content": "Hel"}, {"content": "lo"}, {"content": " there"}]
    final = result.chunks[-1]
    assert final["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert final["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}  # on the final chunk
    assert {c["model"] for c in result.chunks} == {"m2"} and len({c["id"] for c in result.chunks}) == 1
    (record,) = backend.records
    assert record.body["model"] == "m2" and record.body["messages"] == MESSAGES and record.stream
    assert record.outcome == "complete" and record.chunks_sent == 3 and record.closed_at is None
    assert record.arrived_at <= record.first_chunk_at <= record.ended_at  # type: ignore[operator]


def test_usage_placement(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    result = chat_stream(base(server), {"messages": MESSAGES, "stream_options": {"include_usage": True}})
    assert result.done and "usage" not in result.chunks[-2] and result.chunks[-2]["choices"][0]["finish_reason"]
    assert result.chunks[-1]["choices"] == [] and result.chunks[-1]["usage"]["completion_tokens"] == 3
    backend.push(Script.text("a", usage=None), Script.text("a", usage=None),
                 Script.text("a", "b", usage={"prompt_tokens": 11, "completion_tokens": 40, "total_tokens": 51}))
    for options in ({}, {"stream_options": {"include_usage": True}}):
        result = chat_stream(base(server), {"messages": MESSAGES, **options})
        assert result.done and all("usage" not in c for c in result.chunks)  # None: no usage at all
    result = chat_stream(base(server), {"messages": MESSAGES})
    assert result.chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 40, "total_tokens": 51}


def test_not_streamed_with_tool_calls_logprobs_and_usage(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.push(Script(deltas=TOOL_DELTAS, finish_reason="tool_calls", prompt_tokens=20))
    answer = sdk(server).chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", "{}")]
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (20, 4)
    backend.push(Script.text("Hi", "!", logprobs=[lp("Hi", -0.1), lp("!", -0.5)]))
    answer = sdk(server).chat.completions.create(model="m1", messages=MESSAGES, logprobs=True)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "Hi!" and answer.choices[0].finish_reason == "stop"
    assert [t.token for t in answer.choices[0].logprobs.content] == ["Hi", "!"]  # type: ignore[union-attr]


def test_streamed_tool_calls_and_logprobs_through_the_sdk(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.push(Script(deltas=TOOL_DELTAS, finish_reason="tool_calls"))
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in sdk(server).chat.completions.create(model="m1", messages=MESSAGES, stream=True):  # type: ignore
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for part in choice.delta.tool_calls or ():
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                call["name"] += (part.function and part.function.name) or ""
                call["arguments"] += (part.function and part.function.arguments) or ""
    assert finish == "tool_calls"
    assert calls == {0: {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                     1: {"id": "call_2", "name": "get_time", "arguments": "{}"}}
    script = Script.text("Hi", "!", logprobs=[lp("Hi", -0.1), lp("!", -0.5)])
    backend.push(script, script)
    plain = chat_stream(base(server), {"messages": MESSAGES})
    assert all(c["choices"][0]["logprobs"] is None for c in plain.chunks)  # not asked: not sent
    asked = chat_stream(base(server), {"messages": MESSAGES, "logprobs": True})
    assert [c["choices"][0]["logprobs"] for c in asked.content_chunks] == [lp("Hi", -0.1), lp("!", -0.5)]


@pytest.mark.parametrize("reason", ["stop", "length", "tool_calls", "content_filter"])
def test_finish_reasons(fake: tuple[FakeBackend, ServerThread], reason: str) -> None:
    backend, server = fake
    backend.default = Script.text("x", finish_reason=reason)
    assert chat_stream(base(server), {"messages": MESSAGES}).chunks[-1]["choices"][0]["finish_reason"] == reason
    answer = sdk(server).chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason == reason


def test_max_tokens_is_honoured(fake: tuple[FakeBackend, ServerThread]) -> None:
    _, server = fake
    result = chat_stream(base(server), {"messages": MESSAGES, "max_tokens": 2})
    assert result.text == "Hello" and result.chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert result.chunks[-1]["usage"]["completion_tokens"] == 2


def test_script_choice_fifo_then_function_then_default(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.choose = lambda body: Script.text("chosen") if body.get("model") == "m2" else None
    backend.push(Script.text("first"), Script.text("second"))
    texts = [chat_stream(base(server), {"model": model, "messages": MESSAGES}).text
             for model in ("m2", "m2", "m2", "m1")]
    assert texts == ["first", "second", "chosen", "Hello there"]
    assert [r.script.content for r in backend.records] == texts  # type: ignore[union-attr]


def test_error_status_with_an_openai_error_body(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.push(Script(error_status=503, error_message="overloaded"), Script(error_status=400, error_type="bad"))
    with pytest.raises(openai.InternalServerError) as raised:
        sdk(server).chat.completions.create(model="m1", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert raised.value.status_code == 503 and "overloaded" in str(raised.value)
    result = chat_stream(base(server), {"messages": MESSAGES})
    assert result.status == 400 and result.body["error"]["type"] == "bad" and result.body["error"]["code"] == 400
    assert [(r.status, r.outcome) for r in backend.records] == [(503, "error"), (400, "error")]


def test_a_cut_stream_has_no_final_chunk_and_no_done(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.push(Script.text("a", "b", "c", "d", cut_after=2))
    result = chat_stream(base(server), {"messages": MESSAGES})
    assert result.status == 200 and not result.done and result.text == "ab"
    assert all(c["choices"][0]["finish_reason"] is None for c in result.chunks)
    assert backend.records[0].outcome == "cut" and backend.records[0].chunks_sent == 2
    backend.push(Script.text("a", "b", cut_after=2))  # cut after the last content chunk: still no final chunk
    result = chat_stream(base(server), {"messages": MESSAGES})
    assert not result.done and result.text == "ab" and all("usage" not in c for c in result.chunks)
    backend.push(Script.text("a", "b", "c", cut_after=1))
    with pytest.raises((openai.APIError, httpx.HTTPError)):  # the SDK sees an incomplete body
        list(sdk(server).chat.completions.create(model="m1", messages=MESSAGES, stream=True))  # type: ignore


def raw_lines(server: ServerThread, body: dict[str, Any], seconds: float) -> tuple[list[str], float]:
    """The raw SSE lines read for `seconds`, then the connection closed; returns when it was closed."""
    lines: list[str] = []
    with httpx.Client(timeout=10) as client, client.stream(
            "POST", f"{server.url}/chat/completions", json={"messages": MESSAGES, "stream": True, **body}) as response:
        assert response.status_code == 200
        began = time.monotonic()
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if time.monotonic() - began >= seconds:
                break
    return lines, time.monotonic()


def test_keepalive_comments_and_a_stream_that_never_sends_a_token(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.push(Script.text("a", "b", keepalive=0.05, first_token_delay=0.4))
    lines, _ = raw_lines(server, {}, 5)  # to the end
    assert lines[0] == ": keep-alive" and lines.count(": keep-alive") >= 4  # silence before the first token
    assert [json.loads(x[5:])["choices"][0]["delta"].get("content") for x in lines if x.startswith("data: {")][:2] \
        == ["a", "b"] and lines[-1] == "data: [DONE]"
    backend.push(Script.text("a", "b", keepalive=0.05, stall_after=0))
    lines, closed = raw_lines(server, {}, 0.6)
    assert set(lines) == {": keep-alive"} and len(lines) >= 5  # only comments, never a token
    record = backend.wait_until(lambda rs: rs[1].outcome and rs[1], what="the close to be recorded")
    assert record.chunks_sent == 0 and record.first_chunk_at is None and record.outcome == "disconnected"
    assert record.keepalives_sent >= 5 and record.closed_at - closed < 0.1


def test_a_stream_stalled_after_tokens(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.push(Script.text("a", "b", "c", keepalive=0.05, stall_after=2))
    lines, _ = raw_lines(server, {}, 0.5)
    data = [x for x in lines if x.startswith("data:")]
    assert len(data) == 2 and lines[2:] and set(lines[2:]) == {": keep-alive"}
    backend.wait_until(lambda rs: rs[0].outcome == "disconnected", what="the disconnect")


def test_greedy_continuation(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.default = Script.text("The ", "gate ", "holds ", "water.", prompt_tokens=9, finish_reason="stop")
    whole = chat_stream(base(server), {"messages": MESSAGES})
    assert whole.text == "The gate holds water." and whole.chunks[-1]["usage"]["prompt_tokens"] == 9
    body = {"messages": [*MESSAGES, {"role": "assistant", "content": "The gate "}], "continue_final_message": True,
            "add_generation_prompt": False, "stream_options": {"include_usage": True}}
    rest = chat_stream(base(server), body)
    assert rest.text == "holds water." and rest.chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert rest.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert rest.chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    assert backend.records[-1].prefix_chunks == 2 and backend.records[-1].continued
    limited = chat_stream(base(server), {**body, "max_tokens": 1})  # the remaining budget, as after a resume
    assert limited.text == "holds " and limited.chunks[-2]["choices"][0]["finish_reason"] == "length"
    answer = sdk(server).chat.completions.create(  # type: ignore[call-overload]
        model="m1", messages=body["messages"], extra_body={"continue_final_message": True})
    assert answer.choices[0].message.content == "holds water." and answer.usage.prompt_tokens == 11
    bad = chat_stream(base(server), {**body, "messages": [*MESSAGES, {"role": "assistant", "content": "The ga"}]})
    assert bad.status == 400 and "not a prefix" in bad.body["error"]["message"]
    plain = chat_stream(base(server), {"messages": [*MESSAGES, {"role": "assistant", "content": "The gate "}]})
    assert plain.text == "The gate holds water."  # without continue_final_message: a fresh answer


def test_disconnect_is_recorded_at_once_and_sending_stops(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.push(Script.text(*[f"t{i} " for i in range(200)], chunk_delay=0.02))
    lines, closed = raw_lines(server, {}, 0.2)
    assert 3 <= len(lines) < 200
    record = backend.wait_until(lambda rs: rs[0].ended_at and rs[0], what="the stream to end")
    assert record.outcome == "disconnected" and record.closed_at is not None
    assert record.closed_at - closed < 0.1, record.closed_at - closed
    sent = record.chunks_sent
    time.sleep(0.2)
    assert record.chunks_sent == sent < 200
    # A silent stream (no keep-alives): the disconnect is seen while it sleeps, through the ASGI message.
    backend.push(Script.text("late", first_token_delay=30))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        payload = json.dumps({"messages": MESSAGES, "stream": True}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        assert sock.recv(1000).startswith(b"HTTP/1.1 200")
        backend.wait_for_requests(2)
        time.sleep(0.1)
    closed = time.monotonic()
    record = backend.wait_until(lambda rs: rs[1].ended_at and rs[1], what="the silent stream to end")
    assert record.outcome == "disconnected" and record.closed_at - closed < 0.1 and record.chunks_sent == 0


def test_not_streamed_delays_and_disconnect(fake: tuple[FakeBackend, ServerThread]) -> None:
    backend, server = fake
    backend.push(Script.text("a", "b", first_token_delay=0.2, chunk_delay=0.1))
    began = time.monotonic()
    answer = sdk(server).chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "ab" and time.monotonic() - began >= 0.3
    backend.push(Script.text("a", stall_after=0))
    with pytest.raises(openai.APITimeoutError):
        openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=0.3).chat.completions.create(
            model="m1", messages=MESSAGES)  # type: ignore[arg-type]
    record = backend.wait_until(lambda rs: rs[1].ended_at and rs[1], what="the hung request to end")
    assert record.outcome == "disconnected" and record.closed_at is not None
