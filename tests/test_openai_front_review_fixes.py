"""The OpenAI-compatible front's second review (openai2), findings 1-3.

1. A resume by regeneration skips as many pieces as were streamed; a regenerated output that turned into a tool
   call inside them must not lose the call's head (id, type, name): it goes out whole after the text streamed
   before (what was streamed is text only, since a non-text delta pins a run and a pinned run is never resumed).
2. A param the engine's JSON encoder (orjson) refuses, an integer outside 64 bits, was stored and then failed at
   the worker as a 502 "worker error": it is a 422 naming the field, on the chat route and the native submit,
   with nothing stored and no backend call.
3. A `stop` string split by a resume by continuation (its head in the output so far, which the backend reads as
   prompt) is found by the engine: the run ends there, finish_reason `stop`, nothing past the match streamed.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import openai
import redis

from sluicegate.sessions.runs import RunSpec
from sluicegate.workers.engines.base import Finish, Token
from tests.fake_backend import FakeBackend, Script, merge_tool_calls, sluicegate_in_front
from tests.helpers import call
from tests.openai_helpers import chat_stream
from tests.test_openai_engine_streams import DONE, RawBackend, chunk, finish_of, spec, stream, tool_call

MODEL = "fake-model"
MESSAGES = [{"role": "user", "content": "the weather?"}]
HEAD = {"index": 0, "id": "c0", "type": "function", "function": {"name": "get_w", "arguments": ""}}
CALL = [{"tool_calls": [HEAD]}, {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}]


def texts(pieces: list[Any]) -> list[str]:
    return [p if isinstance(p, str) else p.text for p in pieces if not isinstance(p, Finish)]


def streamed_answer(chunks: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], str | None]:
    """A chat stream's text, its tool calls assembled by index, and its finish_reason."""
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    finish = next((c["choices"][0]["finish_reason"] for c in chunks
                   if c.get("choices") and c["choices"][0].get("finish_reason")), None)
    return "".join(d.get("content") or "" for d in deltas), merge_tool_calls(deltas), finish


# ---- 1. a regenerated resume that turned into a tool call ------------------------------------------------


def test_a_regenerated_resume_never_skips_a_tool_calls_head() -> None:
    """start_index 2 ("ab" streamed): the regenerated output says "a", then a tool call. The head goes out."""
    pieces = [chunk({"content": "a"}), chunk(tool_call(**HEAD)), chunk(tool_call(function={"arguments": "{}"})),
              chunk({}, "tool_calls"), DONE]
    out, error = asyncio.run(stream(RawBackend(pieces), spec(max_tokens=8, start_index=2), "ab", continues=False))
    assert error is None, error
    assert [p.delta for p in out if isinstance(p, Token)] == [tool_call(**HEAD), tool_call(
        function={"arguments": "{}"})], out
    assert finish_of(out).reason == "tool_calls"


def test_a_regenerated_resume_that_turns_into_a_tool_call_sends_the_call_whole(redis_url: str) -> None:
    """The reviewer's case end to end (backend_continue no): "Let", " me" streamed, the backend cut; the
    regenerated call is a tool call from its first chunk. Streamed and not, the client gets the text so far and
    the whole call, never a call without id, type or name."""
    first = Script(deltas=[{"content": "Let"}, {"content": " me"}, {"content": " see"}], cut_after=2)
    second = Script(deltas=CALL, finish_reason="tool_calls")
    fake = FakeBackend(models=[MODEL])
    with sluicegate_in_front(fake, redis_url, backend_continue="no") as (stack, _):
        fake.push(first, second)
        raw = chat_stream(stack.base_url, {"model": MODEL, "messages": MESSAGES})
        assert raw.status == 200 and raw.done, raw.body
        text, calls, finish = streamed_answer(raw.chunks)
        assert text == "Let me" and finish == "tool_calls"
        assert [(c["id"], c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
            ("c0", "function", "get_w", '{"city":"Paris"}')], calls
        fake.push(first, second)
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", timeout=30, max_retries=0)
        whole = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me"
        assert [(c.id, c.type, c.function.name, c.function.arguments)  # type: ignore[union-attr]
                for c in choice.message.tool_calls or ()] == [("c0", "function", "get_w", '{"city":"Paris"}')]
        assert [r.outcome for r in fake.records] == ["cut", "complete", "cut", "complete"]
        assert not any(r.continued for r in fake.records)  # regenerated, as the setting says


# ---- 2. params orjson cannot encode --------------------------------------------------------------------


def assert_refused(status: int, body: Any, field: str) -> None:
    assert status == 422, (status, body)
    error = body["error"]
    assert error["type"] == "invalid_request" and error["message"].startswith(f"{field}: "), error
    assert "64 bits" in error["message"], error


def test_an_integer_param_outside_64_bits_is_a_422_naming_it_on_the_chat_route(redis_url: str,
                                                                                r: redis.Redis) -> None:
    fake = FakeBackend(models=[MODEL], default=Script.text("a", "b"))
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        base = stack.base_url
        status, body = call("POST", f"{base}/v1/chat/completions",
                            {"model": MODEL, "messages": MESSAGES, "seed": 2**64})
        assert_refused(status, body, "seed")
        raw = chat_stream(base, {"model": MODEL, "messages": MESSAGES, "seed": -(2**63) - 1})
        assert_refused(raw.status, raw.body, "seed")
        status, body = call("POST", f"{base}/v1/chat/completions",
                            {"model": MODEL, "messages": MESSAGES, "response_format": {"type": "json_schema",
                             "json_schema": {"schema": {"maximum": 10**30}}}})
        assert_refused(status, body, "response_format.json_schema.schema.maximum")
        assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == [], "a refused call left state behind"
        assert fake.records == []
        # the edges of what orjson writes still go through, to the backend unchanged
        status, body = call("POST", f"{base}/v1/chat/completions",
                            {"model": MODEL, "messages": MESSAGES, "seed": 2**64 - 1, "n2": -(2**63)})
        assert status == 200, body
        assert fake.records[-1].body["seed"] == 2**64 - 1 and fake.records[-1].body["n2"] == -(2**63)
        # a field the engine owns (README: ignored) is never sent: no reason to refuse the call
        status, body = call("POST", f"{base}/v1/chat/completions",
                            {"model": MODEL, "messages": MESSAGES, "priority": 2**64, "add_generation_prompt": 2**64})
        assert status == 200, body
        sent = fake.records[-1].body
        assert sent.get("priority") != 2**64 and "add_generation_prompt" not in sent  # (a priority is the engine's)


def test_an_integer_param_outside_64_bits_is_a_422_naming_it_on_the_native_submit(redis_url: str,
                                                                                   r: redis.Redis) -> None:
    fake = FakeBackend(models=[MODEL], default=Script.text("a", "b"))
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        url = f"{stack.base_url}/v1/sessions/big/requests"
        status, body = call("POST", url, {"messages": MESSAGES, "params": {"seed": 2**64}})
        assert_refused(status, body, "params.seed")
        status, body = call("POST", url, {"prompt": "x", "params": {"tools": [{"n": 1}, {"n": -(2**64)}]}})
        assert_refused(status, body, "params.tools[1].n")
        assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == [], "a refused submit left state behind"
        assert fake.records == []


# ---- 3. a stop string across a continuation's seam ------------------------------------------------------


def with_params(max_tokens: int, start_index: int, **params: Any) -> RunSpec:
    return replace(spec(max_tokens=max_tokens, start_index=start_index), params=params)


def run_continued(so_far: str, after: list[str], **params: Any) -> tuple[list[Any], Any]:
    """A run continued after `so_far`, whose backend streams `after` (then stop): what the engine yields."""
    pieces = [chunk({"content": text}) for text in after] + [chunk({}, "stop"), DONE]
    backend = RawBackend(pieces)
    out, error = asyncio.run(stream(backend, with_params(20, len(so_far), **params), so_far, continues=True))
    assert error is None, error
    assert backend.bodies[0]["continue_final_message"] is True
    return out, backend


def test_a_stop_string_split_by_the_seam_ends_the_run_there() -> None:
    out, _ = run_continued("Thought: rain\nObs", ["erv", "ation:", " sunny", "\nAnswer"],
                           stop=["\nObservation:", "never"])
    assert texts(out) == [] and finish_of(out).reason == "stop"
    out, _ = run_continued("Thought: rain\n", ["Observation: sunny"], stop="\nObservation:")  # a string, one piece
    assert texts(out) == [] and finish_of(out).reason == "stop"
    out, _ = run_continued("\nObserva", ["tion: x"], stop=["\nObservation:"])  # so far: shorter than the stop
    assert texts(out) == [] and finish_of(out).reason == "stop"


def test_a_near_miss_at_the_seam_streams_everything_in_order() -> None:
    out, _ = run_continued("Thought: rain\n", ["Obs", "cure", " then", "\nObservation:x"], stop=["\nObservation:"])
    assert texts(out) == ["Obs", "cure", " then", "\nObservation:x"]  # one wholly after the seam: the backend's
    assert finish_of(out).reason == "stop"
    out, _ = run_continued("ends with Obs", ["ervation:"], stop=["\nObservation:"])  # no newline before: no match
    assert texts(out) == ["ervation:"]
    out, _ = run_continued("a\nObs", ["erv"], stop=["\nObservation:"])  # the stream ends while a match may come
    assert texts(out) == ["erv"] and finish_of(out).reason == "stop"


def test_include_stop_str_in_output_streams_up_to_the_match_end() -> None:
    out, _ = run_continued("x\nObs", ["erva", "tion: y", " z"], stop=["\nObservation:"],
                           include_stop_str_in_output=True)
    assert texts(out) == ["erva", "tion:"] and finish_of(out).reason == "stop"


def test_a_stop_string_split_by_a_preemption_seam_stops_the_chat_answer(redis_url: str) -> None:
    """End to end: "Thought: rain", "\\n" streamed, the backend cut; the continuation (the fake, like vLLM, looks
    for no stop string in the prompt) streams "Observation:" and a hallucinated observation. The answer ends
    where it would have uninterrupted."""
    deltas = [{"content": "Thought: rain"}, {"content": "\n"}, {"content": "Observation:"},
              {"content": " sunny"}, {"content": "\nAnswer: dry"}]
    fake = FakeBackend(models=[MODEL])
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        fake.push(Script(deltas=deltas, cut_after=2), Script(deltas=deltas))
        raw = chat_stream(stack.base_url, {"model": MODEL, "messages": MESSAGES, "stop": ["\nObservation:"]})
        assert raw.status == 200 and raw.done, raw.body
        text, calls, finish = streamed_answer(raw.chunks)
        assert (text, calls, finish) == ("Thought: rain\n", [], "stop")
        first, resumed = fake.records
        assert first.outcome == "cut" and resumed.continued and resumed.body["stop"] == ["\nObservation:"]
