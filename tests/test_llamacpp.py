"""Sluicegate in front of a real engine: llama-cpp-python's OpenAI-compatible server, serving the small
generated llama model of tests/llamacpp.py (greedy decoding walks a fixed successor table, so every
answer is known in advance: `continuation`). Skipped without the `engines` extra.

The engine, as measured here: one request at a time (no endpoint says so); it ignores `priority`,
`stream_options`, `continue_final_message` and `add_generation_prompt` (unknown fields are dropped) and
reports no usage in a stream; its stream carries a role-only chunk, then one chunk per character (a
character of several byte tokens is one chunk), then a chunk with an empty delta and the
finish_reason, then `[DONE]`; a client that disconnects stops its generation within a token.

What must come through Sluicegate:
- stream and non-stream answers, identical to the engine's own;
- `finish_reason: "stop"` when the engine stops at its end-of-sequence token;
- the engine's usage (its non-streamed answer counts tokens; a stream of characters cannot);
- a cancel frees the engine: a request waiting for it gets its first token within 200 ms;
- a high-priority request preempts at once on a one-at-a-time engine (the worker's slots match it);
- a stream the engine cuts short (a bare `[DONE]`) is not reported as a finished answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp.server.app", reason="needs the engines extra: pip install -e '.[engines]'")
pytest.importorskip("gguf", reason="needs the engines extra: pip install -e '.[engines]'")

import openai  # noqa: E402

from sluicegate.loadtest.engine_servers import LlamaServer, continuation  # noqa: E402
from tests.helpers import SseEvent, Stack, call, sse  # noqa: E402
from tests.llamacpp import (  # noqa: E402, F401 - the fixtures llama_model and llama_server
    gate_in_front,
    llama_model_fixture,
    llama_server_fixture,
)

# The cluster pass would only repeat these against the same engine (and double their minute).
pytestmark = pytest.mark.own_servers

LONG = [{"role": "user", "content": "Recite the alphabet, slowly z"}]  # ends in "z": the endless cycle
TO_EOS = [{"role": "user", "content": "Count to the end A"}]  # ends in "A": 38 tokens, then </s>


@pytest.fixture
def gate(llama_server: LlamaServer, redis_url: str) -> Iterator[Stack]:
    with gate_in_front(llama_server, redis_url) as stack:
        yield stack


def post(base: str, session: str, **body: Any) -> str:
    """A greedy request through Sluicegate's own API; its id."""
    code, reply = call("POST", f"{base}/v1/sessions/{session}/requests", {"params": {"temperature": 0}, **body})
    assert code == 202, reply
    return reply["request_id"]


def events(base: str, request_id: str, **options: Any) -> list[SseEvent]:
    """A request's events up to its end (or `stop_after`)."""
    return list(sse(base, f"/v1/requests/{request_id}/events", timeout=60,
                    until=lambda e: e.event in ("done", "error", "cancelled"), **options))


def text_of(seen: list[SseEvent]) -> str:
    return "".join(str(e.data.get("text", "")) for e in seen if e.event == "token")


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)


def streamed(base_url: str, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """A streamed greedy chat completion read as a client reads it."""
    text, finish, usage, deltas = "", None, None, 0
    stream = client(base_url).chat.completions.create(model=model, messages=messages, stream=True, temperature=0,
                                                      **kwargs)
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
                deltas += 1
            finish = choice.finish_reason or finish
    return {"text": text, "finish_reason": finish, "usage": usage.model_dump() if usage else None, "deltas": deltas}


def plain(base_url: str, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    answer = client(base_url).chat.completions.create(model=model, messages=messages, temperature=0, **kwargs)
    choice = answer.choices[0]
    return {"text": choice.message.content, "finish_reason": choice.finish_reason,
            "usage": answer.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})}


def usage_of(answer: dict[str, Any]) -> dict[str, int]:
    return {k: answer["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


# ---- the engine itself (the ground the other tests stand on) -----------------------------------------
def test_the_engine_answers_as_the_model_says(llama_server: LlamaServer) -> None:
    model = llama_server.alias
    text, tokens, finish = continuation(LONG[0]["content"], 60)
    direct = plain(llama_server.url, model, LONG, max_tokens=60)
    assert (direct["text"], direct["usage"]["completion_tokens"], direct["finish_reason"]) == (text, tokens, finish)
    assert text.count("é") == 3  # 3 characters of 2 tokens: 60 tokens, 57 characters
    stream = streamed(llama_server.url, model, LONG, max_tokens=60, stream_options={"include_usage": True})
    assert (stream["text"], stream["finish_reason"], stream["usage"]) == (text, "length", None)  # no usage streamed
    assert stream["deltas"] == 57  # one chunk per character

    text, tokens, finish = continuation(TO_EOS[0]["content"], 200)
    assert (tokens, finish) == (38, "stop")
    assert plain(llama_server.url, model, TO_EOS, max_tokens=200)["finish_reason"] == "stop"
    assert streamed(llama_server.url, model, TO_EOS, max_tokens=200)["finish_reason"] == "stop"


# ---- through Sluicegate ---------------------------------------------------------------------------
def test_non_stream(gate: Stack, llama_server: LlamaServer) -> None:
    model = llama_server.alias
    engine = plain(llama_server.url, model, LONG, max_tokens=40)
    answer = plain(f"{gate.base_url}/v1", model, LONG, max_tokens=40)
    assert (answer["text"], answer["finish_reason"]) == (engine["text"], "length")


def test_stream(gate: Stack, llama_server: LlamaServer) -> None:
    model = llama_server.alias
    started = time.monotonic()
    engine = streamed(llama_server.url, model, LONG, max_tokens=300)
    direct = time.monotonic() - started
    started = time.monotonic()
    answer = streamed(f"{gate.base_url}/v1", model, LONG, max_tokens=300)
    elapsed = time.monotonic() - started
    assert (answer["text"], answer["finish_reason"]) == (engine["text"], "length")
    assert answer["text"] == continuation(LONG[0]["content"], 300)[0]
    # a long request really runs on the engine: about as long as the engine's own answer (0.9-4 s here,
    # with the host's load; a fixed second failed on a quiet host)
    assert elapsed > 0.5 * direct, (elapsed, direct)


def test_finish_reason_stop_at_end_of_sequence(gate: Stack, llama_server: LlamaServer) -> None:
    """The engine stops at </s> after 38 tokens of 200 allowed: `stop`, streamed or not."""
    model = llama_server.alias
    text, _, _ = continuation(TO_EOS[0]["content"], 200)
    engine = streamed(llama_server.url, model, TO_EOS, max_tokens=200)
    assert (engine["text"], engine["finish_reason"]) == (text, "stop")
    stream = streamed(f"{gate.base_url}/v1", model, TO_EOS, max_tokens=200)
    answer = plain(f"{gate.base_url}/v1", model, TO_EOS, max_tokens=200)
    assert (stream["text"], stream["finish_reason"]) == (text, "stop")
    assert (answer["text"], answer["finish_reason"]) == (text, "stop")


def test_usage_is_the_engines(gate: Stack, llama_server: LlamaServer) -> None:
    """The engine counts 19 prompt tokens (`<s>` and 18 characters) and 38 completion tokens for 36
    characters (`€` is three byte tokens); Sluicegate must report the same, streamed (include_usage) or not.
    The engine's stream carries no usage: only its non-streamed answer says what it counted."""
    model = llama_server.alias
    engine = usage_of(plain(llama_server.url, model, TO_EOS, max_tokens=200))
    assert engine == {"prompt_tokens": 19, "completion_tokens": 38, "total_tokens": 57}
    stream = streamed(f"{gate.base_url}/v1", model, TO_EOS, max_tokens=200, stream_options={"include_usage": True})
    answer = plain(f"{gate.base_url}/v1", model, TO_EOS, max_tokens=200)
    assert {"stream": usage_of(stream), "non-stream": usage_of(answer)} == {"stream": engine, "non-stream": engine}


def test_a_cancel_frees_the_engine(gate: Stack, llama_server: LlamaServer) -> None:
    """A long request runs (1,000 tokens: over 10 s); a second one waits for the one-at-a-time engine;
    cancelling the first must let the second's first token out within 200 ms."""
    base, model = gate.base_url, llama_server.alias
    long_id = post(base, "long", messages=LONG, max_tokens=1000)
    seen = events(base, long_id, stop_after=6)
    assert sum(e.event == "token" for e in seen) >= 3, seen

    first_token: list[float] = []

    def second() -> None:
        stream = client(f"{base}/v1").chat.completions.create(model=model, messages=TO_EOS, stream=True,
                                                              temperature=0, max_tokens=5)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not first_token:
                first_token.append(time.monotonic())

    waiting = threading.Thread(target=second, daemon=True)
    waiting.start()
    time.sleep(0.5)
    assert not first_token, "the engine ran the second request beside the first"
    cancelled_at = time.monotonic()
    code, _ = call("DELETE", f"{base}/v1/requests/{long_id}")
    assert code in (200, 202), code
    waiting.join(30)
    assert first_token, "the second request got no token"
    waited = first_token[0] - cancelled_at
    assert waited < 0.2, f"the second request's first token came {waited:.2f} s after the cancel"
    assert events(base, long_id)[-1].event == "cancelled"


# ---- beyond the three: what else goes wrong in front of this engine today ---------------------
def test_a_high_priority_request_preempts_on_a_one_at_a_time_engine(gate: Stack, llama_server: LlamaServer) -> None:
    """The issue's first failure as it shows today: the worker believes it has several slots (the
    engine runs one request at a time), so a high-priority request is not a preemption but a second
    stream the engine queues behind the long low-priority one (seconds). With the slot count probed from
    the engine (one), it preempts, and the engine is free at once."""
    base = gate.base_url
    low = post(base, "low", messages=LONG, max_tokens=400, priority=1)  # about 5 s of the engine
    assert sum(e.event == "token" for e in events(base, low, stop_after=5)) >= 2
    submitted = time.monotonic()
    high = post(base, "high", messages=TO_EOS, max_tokens=200, priority=9)
    first = next(e for e in events(base, high) if e.event in ("token", "done", "error"))
    waited = time.monotonic() - submitted
    assert first.event == "token", first
    assert waited < 1.0, f"the high-priority request's first token came {waited:.2f} s after its submit"


def test_a_stream_the_engine_cuts_short_is_not_an_answer(llama_model: Path, redis_url: str) -> None:
    """llama-cpp-python's default (`interrupt_requests` on): a request arriving while another streams ends
    that stream at once with a bare `[DONE]`, no finish_reason. Here another client calls the engine
    directly in the middle of a Sluicegate run: the run must not be reported `done` with a cut text and
    a made-up `stop`, but resumed (regenerated) to the engine's whole answer."""
    with LlamaServer(llama_model, interrupt_requests=True) as server, gate_in_front(server, redis_url) as gate:
        base = gate.base_url
        rid = post(base, "first", messages=LONG, max_tokens=120)
        assert sum(e.event == "token" for e in events(base, rid, stop_after=6)) >= 3
        elsewhere = plain(server.url, server.alias, TO_EOS, max_tokens=200)  # interrupts the run's stream
        assert elsewhere["finish_reason"] == "stop"
        seen = events(base, rid)
        text, _, finish = continuation(LONG[0]["content"], 120)
        assert [e.event for e in seen].count("preempted") >= 1, "the engine did not cut the stream"
        assert seen[-1].event == "done" and seen[-1].data["finish_reason"] == finish == "length"
        assert text_of(seen) == text


# ---- what the worker learns from the engine, and the resumes it makes of it ------------------------------
def test_the_worker_shows_what_it_probed_from_the_engine(gate: Stack) -> None:
    """llama-cpp-python: one request at a time (so one slot), no continuation of a partial answer, no
    usage in streams, `priority` not refused; operators see it in /v1/admin/stats."""
    workers = call("GET", f"{gate.base_url}/v1/admin/stats")[1]["workers"]
    assert len(workers) == 1
    shown = workers[0]
    assert shown["slots"] == 1 and shown["resume"] == "regenerate" and shown["engine"] == "openai"
    assert shown["capabilities"] == {"server": "llama-cpp-python", "slots": 1, "accepts_priority": True,
                                     "priority_higher_first": False, "continues": False, "streams_usage": False,
                                     "counts_tokens": True, "interrupts": True, "budget_field": "max_tokens"}


def test_a_preempted_run_resumes_by_regenerating_to_the_same_text(gate: Stack, llama_server: LlamaServer) -> None:
    """The engine cannot continue a partial answer: the resumed run asks for the whole answer again and
    skips what was streamed; under greedy decoding the text is the one never preempted (README
    "Engines"), the `resumed` event says `regenerate`, and usage and finish_reason are the engine's."""
    base = gate.base_url
    low = post(base, "low", messages=TO_EOS, max_tokens=200, priority=1)
    assert sum(e.event == "token" for e in events(base, low, stop_after=8)) >= 3
    high = post(base, "high", messages=[{"role": "user", "content": "B"}], max_tokens=10, priority=9)
    assert events(base, high)[-1].event == "done"
    seen = events(base, low)
    text, tokens, finish = continuation(TO_EOS[0]["content"], 200)
    assert [e.event for e in seen].count("preempted") == 1 and seen[-1].event == "done"
    resumed = next(e for e in seen if e.event == "resumed")
    assert resumed.data["resume"] == "regenerate" and resumed.data["index"] >= 3
    assert text_of(seen) == text and seen[-1].data["finish_reason"] == finish == "stop"
    assert seen[-1].data["usage"]["completion_tokens"] == tokens  # the engine's count, not the deltas'
    indices = [e.data["index"] for e in seen if e.event == "token"]
    assert indices == list(range(len(indices)))  # each index once, across the preemption


def test_kill_9_of_the_worker_mid_stream(llama_server: LlamaServer, redis_url: str, r: Any, tmp_path: Path) -> None:
    """The worker process dies (kill -9) while the engine streams to it: its lease lapses, the run
    resumes on another worker, and the request ends with the engine's whole answer, each index once."""
    import signal

    from tests.helpers import fast_settings
    from tests.worker_helpers import WorkerProcess

    settings = fast_settings(redis_url, engine="openai", backend_url=llama_server.url, backend_model=llama_server.alias,
                             backend_retries=1, backend_probe=True, slots=None)
    stack = Stack(settings).start(workers=0)
    victim = WorkerProcess(settings, str(tmp_path / "victim.log"))
    try:
        victim.registered(r)
        rid = post(stack.base_url, "crash", messages=TO_EOS, max_tokens=200)
        assert sum(e.event == "token" for e in events(stack.base_url, rid, stop_after=8)) >= 3
        victim.signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        stack.add_worker()
        seen = events(stack.base_url, rid)
        text, tokens, finish = continuation(TO_EOS[0]["content"], 200)
        preempted = [e for e in seen if e.event == "preempted"]
        assert len(preempted) == 1 and preempted[0].data["reason"] == "worker_lost"
        assert text_of(seen) == text and seen[-1].event == "done" and seen[-1].data["finish_reason"] == finish
        indices = [e.data["index"] for e in seen if e.event == "token"]
        assert indices == list(range(len(indices)))
    finally:
        victim.close()
        stack.stop()
