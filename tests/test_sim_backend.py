"""The sim-backend: an OpenAI-compatible server whose text is exactly the sim engine's."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator

import pytest

from sluicegate.embedded import free_port
from sluicegate.sessions.runs import RunSpec
from sluicegate.settings import Settings
from sluicegate.workers.engines.sim import SimEngine, prompt_of, prompt_seed, sim_text, sim_token
from sluicegate.workers.sim_backend import Faults, create_sim_backend
from tests.helpers import call, spawn, stop_process, wait_for
from tests.openai_helpers import ServerThread, chat_stream

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about sluice gates"}]


@pytest.fixture(scope="module")
def backend() -> Iterator[ServerThread]:
    with ServerThread(create_sim_backend(2000.0, 0.0)) as server:
        yield server


def sim_engine_text(messages: list[dict[str, str]], count: int) -> str:
    """What the sim engine itself generates for these messages (the reference the backend must match)."""
    spec = RunSpec(request_id="r", attempt="1", session_id="s", group="default", tenant="t", priority=5,
                   max_tokens=count, start_index=0, input_kind="m", input_text=json.dumps(messages), params={})

    async def collect() -> str:
        return "".join([t async for t in SimEngine(tokens_per_second=0, prefill_ms=0).stream(spec, "")])

    return asyncio.run(collect())


def test_models(backend: ServerThread) -> None:
    code, reply = call("GET", f"{backend.url}/models")
    assert code == 200 and reply["object"] == "list"
    assert [m["id"] for m in reply["data"]] == ["sim"]


def test_not_streamed_matches_the_sim_engine(backend: ServerThread) -> None:
    code, reply = call("POST", f"{backend.url}/chat/completions", {"model": "m1", "messages": MESSAGES,
                                                                   "max_tokens": 9})
    assert code == 200, reply
    assert reply["object"] == "chat.completion" and reply["model"] == "m1"
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == sim_engine_text(MESSAGES, 9)
    usage = reply["usage"]
    assert usage["completion_tokens"] == 9 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 9
    code, reply = call("POST", f"{backend.url}/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 3})
    assert code == 200 and reply["usage"]["completion_tokens"] == 3
    assert reply["choices"][0]["message"]["content"] == sim_engine_text(MESSAGES, 3)


def test_streamed_one_chunk_per_token(backend: ServerThread) -> None:
    result = chat_stream(backend.url, {"messages": MESSAGES, "max_tokens": 12,
                                       "stream_options": {"include_usage": True}})
    assert result.status == 200 and result.headers["content-type"].startswith("text/event-stream")
    assert result.done
    seed = prompt_seed(prompt_of(MESSAGES))
    assert [c["choices"][0]["delta"]["content"] for c in result.content_chunks] == [
        sim_token(seed, i) for i in range(12)]
    assert result.text == sim_engine_text(MESSAGES, 12)
    assert result.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in result.chunks)
    assert len({c["id"] for c in result.chunks}) == 1
    finish, usage = result.chunks[-2], result.chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    plain = chat_stream(backend.url, {"messages": MESSAGES, "max_tokens": 2})  # usage not asked for
    assert plain.done and len(plain.content_chunks) == 2 and not any("usage" in c for c in plain.chunks)
    assert plain.chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [True, False])
def test_continuation_equals_the_uninterrupted_output(backend: ServerThread, stream: bool) -> None:
    head = chat_stream(backend.url, {"messages": MESSAGES, "max_tokens": 4}).text
    assert head == sim_text(prompt_of(MESSAGES), 4)
    body = {"messages": [*MESSAGES, {"role": "assistant", "content": head}], "max_tokens": 7,
            "continue_final_message": True, "add_generation_prompt": False}
    if stream:
        tail = chat_stream(backend.url, body)
        assert tail.done and len(tail.content_chunks) == 7
        rest = tail.text
    else:
        code, reply = call("POST", f"{backend.url}/chat/completions", body)
        assert code == 200 and reply["usage"]["completion_tokens"] == 7
        rest = reply["choices"][0]["message"]["content"]
    assert head + rest == sim_engine_text(MESSAGES, 11)
    # without continue_final_message the assistant message is just more prompt: a different text
    code, reply = call("POST", f"{backend.url}/chat/completions", {**body, "continue_final_message": False})
    assert code == 200 and head + reply["choices"][0]["message"]["content"] != sim_engine_text(MESSAGES, 11)


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": "hi"}, {"messages": MESSAGES, "max_tokens": 0},
                                  {"messages": MESSAGES, "max_tokens": "5"}])
def test_bad_bodies_get_400(backend: ServerThread, body: dict[str, object]) -> None:
    code, reply = call("POST", f"{backend.url}/chat/completions", body)
    assert code == 400 and reply["error"]["message"]
    code, reply = call("POST", f"{backend.url}/chat/completions", raw=b"{not json")
    assert code == 400 and "error" in reply


def test_injected_faults_are_per_app_and_bounded() -> None:
    faults = Faults(fail_first=2, break_streams=1, break_after=3, reject_priority=True)
    with ServerThread(create_sim_backend(2000.0, 0.0, faults=faults)) as server:
        body = {"messages": MESSAGES, "max_tokens": 6}
        assert [call("POST", f"{server.url}/chat/completions", body)[0] for _ in range(3)] == [503, 503, 200]
        broken = chat_stream(server.url, body)
        assert broken.status == 200 and not broken.done and len(broken.content_chunks) == 3
        whole = chat_stream(server.url, body)
        assert whole.done and whole.text == sim_engine_text(MESSAGES, 6)
        code, reply = call("POST", f"{server.url}/chat/completions", {**body, "priority": 2})
        assert code == 400 and "priority" in reply["error"]["message"].lower()
        assert call("POST", f"{server.url}/chat/completions", {**body, "priority": 0})[0] == 200
    # another app is not affected by this one's faults
    with ServerThread(create_sim_backend(2000.0, 0.0)) as server:
        assert call("POST", f"{server.url}/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[0] == 200


def test_cli_serves_the_sim_backend() -> None:
    port = free_port()
    proc = spawn("sim-backend", Settings(port=port, sim_tokens_per_second=1000.0, sim_prefill_ms=0.0,
                                         log_level="warning"))
    try:
        url = f"http://127.0.0.1:{port}/v1"

        def up() -> bool:
            try:
                return call("GET", f"{url}/models")[0] == 200
            except OSError:
                return False

        wait_for(up, timeout=20, interval=0.1, what="sluicegate sim-backend")
        result = chat_stream(url, {"messages": MESSAGES, "max_tokens": 5})
        assert result.done and result.text == sim_engine_text(MESSAGES, 5)
    finally:
        assert stop_process(proc) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful stop
