"""`POST /v1/chat/completions`: OpenAI objects over an ordinary Sluicegate request (sim engine)."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest
import redis

from sluicegate.workers.engines.openai import OpenAIEngine
from sluicegate.workers.engines.sim import prompt_of, sim_text
from sluicegate.workers.sim_backend import Faults, create_sim_backend
from tests.helpers import Stack, call, fast_settings
from tests.openai_helpers import ChatStream, ServerThread, chat_stream

MESSAGES = [{"role": "system", "content": "short answers"}, {"role": "user", "content": "why queue requests?"}]


def request_status(stack: Stack, rid: str) -> dict[str, Any]:
    code, status = call("GET", f"{stack.base_url}/v1/requests/{rid}")
    assert code == 200
    return status


def test_streamed(stack: Stack) -> None:
    headers = {"X-Session-Id": "chat-1", "X-Priority": "high", "X-Tenant": "acme", "X-Group": "default"}
    result = chat_stream(stack.base_url, {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 0},
                         headers)
    assert result.status == 200 and result.headers["content-type"].startswith("text/event-stream")
    rid = result.headers["x-request-id"]
    assert result.headers["x-session-id"] == "chat-1" and result.done
    assert len(result.content_chunks) == 12 and result.text == sim_text(prompt_of(MESSAGES), 12)
    assert {c["id"] for c in result.chunks} == {f"chatcmpl-{rid}"}
    assert {c["model"] for c in result.chunks} == {"tiny"}
    assert result.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    final = result.chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert final["usage"]["completion_tokens"] == 12 and final["usage"]["prompt_tokens"] > 0
    status = request_status(stack, rid)
    assert (status["status"], status["priority"], status["tenant"], status["group"], status["session_id"]) == (
        "done", 7, "acme", "default", "chat-1")


def test_streamed_usage_chunk_when_asked(stack: Stack) -> None:
    result = chat_stream(stack.base_url, {"messages": MESSAGES, "max_completion_tokens": 5,
                                          "stream_options": {"include_usage": True}})
    assert result.done and result.text == sim_text(prompt_of(MESSAGES), 5)
    finish, usage = result.chunks[-2], result.chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "length" and "usage" not in finish
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert result.chunks[0]["model"] == "default"  # no model in the body: the group's name


def test_not_streamed(stack: Stack) -> None:
    assert call("PUT", f"{stack.base_url}/v1/admin/groups/default", {"model": "tiny"})[0] == 200
    code, reply = call("POST", f"{stack.base_url}/v1/chat/completions",
                       {"model": "tiny", "messages": MESSAGES, "max_tokens": 9}, headers={"X-Priority": "3"})
    assert code == 200, reply
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny"
    choice = reply["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": sim_text(prompt_of(MESSAGES), 9)}
    assert choice["finish_reason"] == "length"
    usage = reply["usage"]
    assert usage["completion_tokens"] == 9 and usage["total_tokens"] == usage["prompt_tokens"] + 9
    status = request_status(stack, reply["id"].removeprefix("chatcmpl-"))
    assert status["priority"] == 3 and status["tenant"] == "default" and status["session_id"].startswith("chat-")


def test_headers_echo_ids_and_a_fresh_session_per_call(stack: Stack) -> None:
    sessions = set()
    for _ in range(2):
        result = chat_stream(stack.base_url, {"messages": MESSAGES, "max_tokens": 2})
        assert result.done
        sessions.add(result.headers["x-session-id"])
        assert request_status(stack, result.headers["x-request-id"])["session_id"] == result.headers["x-session-id"]
    assert len(sessions) == 2
    for count in (5, 3):  # a reused session: each call streams its own request only
        result = chat_stream(stack.base_url, {"messages": MESSAGES, "max_tokens": count}, {"X-Session-Id": "reused"})
        assert result.done and result.text == sim_text(prompt_of(MESSAGES), count)
        assert len(result.content_chunks) == count and result.chunks[-1]["usage"]["completion_tokens"] == count


def test_x_group_routes_to_that_group(stack: Stack) -> None:
    stack.add_worker(group="big")
    result = chat_stream(stack.base_url, {"messages": MESSAGES, "max_tokens": 3}, {"X-Group": "big"})
    assert result.done and result.chunks[0]["model"] == "big"
    assert request_status(stack, result.headers["x-request-id"])["group"] == "big"


@pytest.mark.parametrize(("headers", "body", "needle"), [
    ({"X-Priority": "urgent"}, {}, "X-Priority"),
    ({"X-Priority": "10"}, {}, "X-Priority"),
    ({"X-Tenant": "no spaces"}, {}, "X-Tenant"),
    ({"X-Group": "a/b"}, {}, "X-Group"),
    ({"X-Session-Id": "bad session"}, {}, "session_id"),
    ({}, {"messages": []}, "messages"),
    ({}, {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({}, {"messages": MESSAGES, "max_tokens": 10**9}, "max_tokens"),
    ({}, {"messages": MESSAGES, "n": 2}, "n"),
])
def test_bad_input_gets_422_and_stores_nothing(stack: Stack, r: redis.Redis, headers: dict[str, str],
                                               body: dict[str, Any], needle: str) -> None:
    for stream in (False, True):
        code, reply = call("POST", f"{stack.base_url}/v1/chat/completions",
                           {"messages": MESSAGES, "max_tokens": 4, **body, "stream": stream}, headers=headers)
        assert code == 422, reply
        assert reply["error"]["type"] == "invalid_request" and needle in reply["error"]["message"]
    assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == []


def test_cancelled_mid_stream_ends_with_an_error_object(stack: Stack) -> None:
    def cancel_once(result: ChatStream, chunk: dict[str, Any]) -> None:
        if len(result.chunks) == 2:
            code, _ = call("DELETE", f"{stack.base_url}/v1/requests/{result.headers['x-request-id']}")
            assert code == 200

    result = chat_stream(stack.base_url, {"messages": MESSAGES, "max_tokens": 4000}, on_chunk=cancel_once)
    assert result.done and 2 <= len(result.content_chunks) < 4000
    assert result.chunks[-1]["error"]["type"] == "cancelled"
    assert request_status(stack, result.headers["x-request-id"])["status"] == "cancelled"


def test_a_failed_generation_maps_to_an_openai_error(redis_url: str) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0)
    # A backend that answers 500 to every call (one not listening makes the request wait: its worker withdraws)
    failing = ServerThread(create_sim_backend(2000.0, 0.0, faults=Faults(fail_first=10**6, fail_status=500))).start()
    try:
        dead = failing.url
        stack.add_worker(engine=OpenAIEngine(dead, models={"*": "m"}, retries=1))
        # Streamed or not, it failed before its first token: its status says so (tests/test_chat_errors.py)
        for stream in (True, False):
            code, reply = call("POST", f"{stack.base_url}/v1/chat/completions",
                               {"messages": MESSAGES, "max_tokens": 4, "stream": stream})
            assert code == 502 and reply["error"]["type"] == reply["error"]["code"] == "generation_failed"
            port = dead.split(":")[-1].split("/")[0]
            assert "HTTP 500" in reply["error"]["message"] and port not in reply["error"]["message"]  # no address
    finally:
        stack.stop()
        failing.stop()


def test_a_client_that_leaves_a_chat_stream_frees_it_and_the_generation_goes_on(stack: Stack) -> None:
    host, port = stack.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", "/v1/chat/completions", json.dumps(  # 4000 tokens at 400/s: 10 s
        {"model": "default", "stream": True, "max_tokens": 4000, "messages": MESSAGES}),
        {"content-type": "application/json"})
    response = connection.getresponse()
    rid = response.getheader("x-request-id")
    assert response.status == 200 and response.readline().startswith(b"data: ")  # the first token arrived
    connection.sock.shutdown(2)  # type: ignore[union-attr]
    connection.close()
    deadline = time.monotonic() + 5
    while call("GET", f"{stack.base_url}/healthz")[1]["open_streams"] != 0:
        assert time.monotonic() < deadline, "the stream stayed open after its client left"
        time.sleep(0.02)
    produced = request_status(stack, rid)["tokens"]
    time.sleep(0.3)
    status = request_status(stack, rid)
    assert status["status"] == "running" and status["tokens"] > produced  # the generation went on
    assert call("DELETE", f"{stack.base_url}/v1/requests/{rid}")[0] == 200


def test_not_streamed_answers_with_its_status_and_ids_once_it_has_ended(stack: Stack) -> None:
    """As a backend's own non-streamed answer: the status line, X-Request-Id and X-Session-Id come with the
    whole completion, once the request has ended (so that a failure, even after tokens, is its own status)."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": MESSAGES, "max_tokens": 200}),
                     {"content-type": "application/json", "X-Session-Id": "early"})
        response = conn.getresponse()  # returns once the status line and headers are in
        rid = response.getheader("x-request-id")
        assert response.status == 200 and response.getheader("x-session-id") == "early" and rid
        status = request_status(stack, rid)
        assert status["status"] == "done" and status["tokens"] == 200  # not before its end
        reply = json.loads(response.read())
        assert reply["id"] == f"chatcmpl-{rid}" and reply["usage"]["completion_tokens"] == 200
        assert reply["choices"][0]["message"]["content"] == sim_text(prompt_of(MESSAGES), 200)
    finally:
        conn.close()
