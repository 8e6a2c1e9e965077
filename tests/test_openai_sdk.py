"""The official openai SDK in front of Sluicegate in front of the scripted fake backend (tests/fake_backend.py).

What a backend says comes through the chat route as OpenAI clients read it: the text, finish_reason,
usage (the backend's numbers, not Sluicegate's estimate), tool calls (streamed deltas by index, or
assembled into `message.tool_calls`), logprobs when asked; the non-streamed answer names its request
and session in headers sent before its body; an unknown model is a NotFoundError. A request preempted
twice, resumed each time through the backend's greedy continuation, answers exactly as if it had
never been interrupted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.fake_backend import FakeBackend, Record, Script, sluicegate_in_front
from tests.helpers import Stack, call, sse, submit

MODEL = "fake-model"
MESSAGES = [{"role": "system", "content": "terse"}, {"role": "user", "content": "weather in Paris?"}]
USAGE = {"prompt_tokens": 1234, "completion_tokens": 77, "total_tokens": 1311}  # not what Sluicegate would count
TOOL_DELTAS = [
    {"content": "Checking."},
    {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": ""}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\""}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": ": \"Paris\"}"}}]},
    {"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                     "function": {"name": "get_time", "arguments": "{\"tz\": \"CET\"}"}}]},
]
EXPECTED_CALLS = [("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", '{"tz": "CET"}')]


def lp(token: str, logprob: float) -> dict[str, Any]:
    return {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}]}


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(models=[MODEL], default=Script.text("The ", "gate ", "holds."))


@pytest.fixture
def gate(fake: FakeBackend, redis_url: str) -> Iterator[Stack]:
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        yield stack


def client(stack: Stack, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0, timeout=30, **options)


def streamed(stack: Stack, **kwargs: Any) -> dict[str, Any]:
    """A streamed call read as a client does: text, tool calls accumulated by index, finish_reason,
    usage, logprobs."""
    text, finish, usage, logprobs = "", None, None, []
    calls: dict[int, dict[str, str]] = {}
    stream = client(stack).chat.completions.create(model=kwargs.pop("model", MODEL), messages=MESSAGES,
                                                   stream=True, **kwargs)
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            if choice.logprobs and choice.logprobs.content:
                logprobs += [(t.token, t.logprob) for t in choice.logprobs.content]
            for part in choice.delta.tool_calls or ():
                call_ = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call_["id"] += part.id or ""
                if part.function is not None:
                    call_["name"] += part.function.name or ""
                    call_["arguments"] += part.function.arguments or ""
    return {"text": text, "finish_reason": finish, "usage": usage.model_dump() if usage else None,
            "tool_calls": [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())],
            "logprobs": logprobs}


def usage_of(answer: Any) -> dict[str, int]:
    return {k: getattr(answer.usage, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def test_streamed_and_not_streamed_text_with_the_backends_usage(fake: FakeBackend, gate: Stack) -> None:
    fake.default = Script.text("The ", "gate ", "holds.", usage=USAGE)
    got = streamed(gate, stream_options={"include_usage": True})
    assert got["text"] == "The gate holds." and got["finish_reason"] == "stop"
    assert {k: got["usage"][k] for k in USAGE} == USAGE
    got = streamed(gate)  # without include_usage: on the final chunk
    assert got["text"] == "The gate holds." and {k: got["usage"][k] for k in USAGE} == USAGE
    answer = client(gate).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert answer.choices[0].message.content == "The gate holds." and answer.choices[0].finish_reason == "stop"
    assert usage_of(answer) == USAGE
    record = fake.records[-1]  # what the backend was asked
    assert record.body["model"] == MODEL and record.body["messages"] == MESSAGES and record.body["stream"] is True


def test_model_default_routes_to_the_default_group(fake: FakeBackend, gate: Stack) -> None:
    answer = client(gate).chat.completions.create(model="default", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "The gate holds."
    assert fake.records[-1].body["model"] == MODEL  # the group's backend model, whatever the caller named


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("reason", ["stop", "length", "tool_calls", "content_filter"])
def test_finish_reasons_come_through(fake: FakeBackend, gate: Stack, reason: str, stream: bool) -> None:
    fake.default = Script.text("partial ", "answer", finish_reason=reason, usage=USAGE)
    if stream:
        got = streamed(gate, max_tokens=50, stream_options={"include_usage": True})
        assert (got["text"], got["finish_reason"]) == ("partial answer", reason)
        assert {k: got["usage"][k] for k in USAGE} == USAGE
    else:
        answer = client(gate).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50)  # type: ignore
        assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == ("partial answer", reason)
        assert usage_of(answer) == USAGE


def test_length_when_max_tokens_cuts_the_answer(fake: FakeBackend, gate: Stack) -> None:
    fake.default = Script.text(*[f"w{i} " for i in range(10)], prompt_tokens=21)
    got = streamed(gate, max_tokens=4, stream_options={"include_usage": True})
    assert got["text"] == "w0 w1 w2 w3 " and got["finish_reason"] == "length"
    assert got["usage"]["prompt_tokens"] == 21 and got["usage"]["completion_tokens"] == 4
    answer = client(gate).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore
    assert answer.choices[0].finish_reason == "length" and usage_of(answer)["completion_tokens"] == 4


def test_tool_calls_streamed_and_assembled(fake: FakeBackend, gate: Stack) -> None:
    fake.default = Script(deltas=TOOL_DELTAS, finish_reason="tool_calls", usage=USAGE)
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("get_weather", "get_time")]
    got = streamed(gate, tools=tools)
    assert got["text"] == "Checking." and got["finish_reason"] == "tool_calls"
    assert got["tool_calls"] == EXPECTED_CALLS
    assert fake.records[-1].body.get("tools") == tools  # the request's tools reach the backend
    answer = client(gate).chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools)  # type: ignore
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert [(c.id, c.type, c.function.name, c.function.arguments)  # type: ignore[union-attr]
            for c in choice.message.tool_calls or ()] == [(i, "function", n, a) for i, n, a in EXPECTED_CALLS]
    assert usage_of(answer) == USAGE


def test_logprobs_when_asked(fake: FakeBackend, gate: Stack) -> None:
    fake.default = Script.text("Hi", " there", logprobs=[lp("Hi", -0.25), lp(" there", -1.5)])
    got = streamed(gate, logprobs=True)
    assert got["text"] == "Hi there" and got["logprobs"] == [("Hi", -0.25), (" there", -1.5)]
    assert fake.records[-1].body.get("logprobs") is True
    answer = client(gate).chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True)  # type: ignore
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [(t.token, t.logprob, t.bytes) for t in content or ()] == [  # type: ignore[union-attr]
        ("Hi", -0.25, list(b"Hi")), (" there", -1.5, list(b" there"))]
    assert streamed(gate)["logprobs"] == []  # not asked: none
    answer = client(gate).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].logprobs is None or not answer.choices[0].logprobs.content


def test_ids_in_headers_of_the_non_streamed_answer(fake: FakeBackend, gate: Stack) -> None:
    raw = client(gate).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_headers={"X-Session-Id": "sdk-1"})  # type: ignore[arg-type]
    rid = raw.headers["x-request-id"]
    assert raw.headers["x-session-id"] == "sdk-1" and raw.parse().id == f"chatcmpl-{rid}"
    code, status = call("GET", f"{gate.base_url}/v1/requests/{rid}")
    assert code == 200 and status["session_id"] == "sdk-1" and status["status"] == "done"


def test_an_unknown_model_is_not_found(gate: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client(gate).chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert raised.value.status_code == 404 and raised.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client(gate).chat.completions.create(model="no-such-model", messages=MESSAGES, stream=True)  # type: ignore
    assert MODEL in [m.id for m in client(gate).models.list()]


# ---- preempted twice == never preempted ------------------------------------------------------------
STORY = [f"t{i:02d} " for i in range(40)]
LOW_MESSAGES = [{"role": "user", "content": "tell me a long story"}]


def by_prompt(body: dict[str, Any]) -> Script | None:
    """The long story for the low request (and its continuations), a short answer for the others."""
    first = body["messages"][0].get("content")
    if first == LOW_MESSAGES[0]["content"]:
        return Script.text(*STORY, chunk_delay=0.04, prompt_tokens=9, finish_reason="stop")
    return Script.text("ok", prompt_tokens=3)


def low_request(stack: Stack, session: str, out: dict[str, Any]) -> None:
    try:
        text, finish, usage = "", None, None
        stream = client(stack).chat.completions.create(
            model=MODEL, messages=LOW_MESSAGES, max_tokens=100, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_headers={"X-Priority": "low", "X-Session-Id": session})
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        out.update(text=text, finish_reason=finish, usage=usage.model_dump() if usage else None)
    except BaseException as error:  # noqa: BLE001 - reported by the test
        out["error"] = error


def low_calls(fake: FakeBackend) -> list[Record]:
    return [r for r in fake.records if r.body["messages"][0].get("content") == LOW_MESSAGES[0]["content"]]


def test_preempted_twice_answers_as_if_never_preempted(fake: FakeBackend, redis_url: str) -> None:
    fake.choose = by_prompt
    # One slot; max_attempts=1: preemptions must not count as failed attempts.
    with sluicegate_in_front(fake, redis_url, slots=1, max_attempts=1) as (stack, _):
        baseline: dict[str, Any] = {}
        low_request(stack, "baseline", baseline)
        assert "error" not in baseline, baseline
        assert baseline["text"] == "".join(STORY) and baseline["finish_reason"] == "stop"
        assert len(low_calls(fake)) == 1

        out: dict[str, Any] = {}
        thread = threading.Thread(target=low_request, args=(stack, "preempted", out), daemon=True)
        thread.start()
        for round_ in (1, 2):  # each time: the low run streams a few tokens, then a critical request arrives
            calls = round_ + 1  # the baseline's, then one per run of the low request
            fake.wait_until(lambda _, n=calls: len(low_calls(fake)) == n and low_calls(fake)[-1].chunks_sent >= 4,
                            what=f"run {round_} of the low request to stream")
            submit(stack.base_url, f"high-{round_}", prompt="hi", max_tokens=5, priority="critical")
            fake.wait_until(lambda _, n=calls: len(low_calls(fake)) == n + 1, timeout=30,
                            what=f"the low request to resume after preemption {round_}")
        thread.join(60)
        assert not thread.is_alive() and "error" not in out, out
        calls = low_calls(fake)
        assert len(calls) == 4  # the baseline, then three calls of the preempted request
        assert [c.prefix_chunks > 0 for c in calls] == [False, False, True, True]  # resumed by continuation
        assert all(c.outcome == "disconnected" for c in calls[1:3])  # the preempted calls were closed
        assert out == baseline  # same text, finish_reason and usage
        rid = next(e.data["request_id"] for e in sse(stack.base_url, "/v1/sessions/preempted/events", stop_after=1))
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events"))
        assert [e.event for e in events].count("preempted") == 2 and events[-1].event == "done"
        assert [e.data["index"] for e in events if e.event == "token"] == list(range(len(STORY)))
        done = events[-1].data
        assert done["finish_reason"] == "stop" and done["usage"]["prompt_tokens"] == 9
        assert done["usage"]["completion_tokens"] == len(STORY)
        assert call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "done"


# ---- a run that streamed a tool call (or reasoning) is never preempted -----------------------------
def test_a_run_streaming_a_tool_call_is_not_preempted(fake: FakeBackend, redis_url: str) -> None:
    """An engine continues text, not a half-made tool call: once a run streamed a tool-call delta it is
    pinned (never preempted), so an agent never gets a call generated twice into broken JSON."""
    slow_tool = [{"content": f"w{i} "} for i in range(6)] + TOOL_DELTAS[1:] + [
        {"tool_calls": [{"index": 1, "function": {"arguments": ""}}]} for _ in range(30)]

    def script(body: dict[str, Any]) -> Script | None:
        if body["messages"][0].get("content") == LOW_MESSAGES[0]["content"]:
            return Script(deltas=slow_tool, chunk_delay=0.05, finish_reason="tool_calls")
        return Script.text("ok", prompt_tokens=3)

    fake.choose = script
    with sluicegate_in_front(fake, redis_url, slots=1) as (stack, _):
        rid = submit(stack.base_url, "agent", prompt=None, messages=LOW_MESSAGES, max_tokens=100, priority="low")
        fake.wait_until(lambda rs: rs and rs[-1].chunks_sent >= 9, what="the tool call to be streaming")
        high = submit(stack.base_url, "urgent", prompt="hi", max_tokens=2, priority="critical")
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=30))
        assert [e.event for e in events].count("preempted") == 0 and events[-1].event == "done"
        assert events[-1].data["finish_reason"] == "tool_calls"
        assert list(sse(stack.base_url, f"/v1/requests/{high}/events", timeout=30))[-1].event == "done"
        agent, urgent = (call("GET", f"{stack.base_url}/v1/requests/{r}")[1] for r in (rid, high))
        assert agent["preemptions"] == 0 and urgent["started_at"] >= agent["finished_at"]  # it waited its turn


def test_a_tool_call_cut_by_the_backend_is_not_resumed_into_broken_json(fake: FakeBackend, gate: Stack) -> None:
    """A backend failure in the middle of a tool call cannot be continued (an engine continues text):
    the request fails with a message that says so, rather than an agent getting a call twice."""
    fake.default = Script(deltas=TOOL_DELTAS, cut_after=3, finish_reason="tool_calls")
    rid = submit(gate.base_url, "cut-tool", prompt=None, messages=MESSAGES, max_tokens=50)
    events = list(sse(gate.base_url, f"/v1/requests/{rid}/events", timeout=30))
    assert events[-1].event == "error" and "streamed a tool call" in events[-1].data["message"]
    assert len(fake.records) == 1  # no second backend call made it into the output


def test_reasoning_cut_by_the_backend_is_said_to_be_reasoning(fake: FakeBackend, gate: Stack) -> None:
    """A reasoning model's run pins on its `reasoning_content` deltas as on a tool call's, and cannot be
    continued either; the message, which tenants read, names reasoning, not a tool call."""
    thinking = [{"reasoning_content": "The user "}, {"reasoning_content": "wants "}, {"reasoning_content": "Paris."},
                {"content": "Sunny."}]
    fake.default = Script(deltas=thinking, cut_after=3)
    rid = submit(gate.base_url, "cut-reasoning", prompt=None, messages=MESSAGES, max_tokens=50)
    events = list(sse(gate.base_url, f"/v1/requests/{rid}/events", timeout=30))
    assert events[-1].event == "error", events[-1]
    message = events[-1].data["message"]
    assert "streamed reasoning, which no engine can continue" in message and "tool call" not in message, message
    assert len(fake.records) == 1


@pytest.mark.parametrize(("fields", "kind"), [
    ({"tool_calls"}, "a tool call"),
    ({"function_call"}, "a tool call"),
    ({"reasoning_content", "tool_calls"}, "a tool call"),  # reasoned, then began a call: the call is what breaks
    ({"reasoning_content"}, "reasoning"),
    ({"reasoning"}, "reasoning"),
    ({"reasoning", "refusal"}, "a non-text delta"),
    ({"refusal"}, "a non-text delta"),
])
def test_what_a_pinned_run_streamed_is_named(fields: set[str], kind: str) -> None:
    from sluicegate.sessions.runs import delta_kind

    assert delta_kind(fields) == kind
