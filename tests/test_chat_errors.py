"""The OpenAI front's statuses and shapes where OpenAI's SDKs depend on them.

A non-streamed call's status waits for its first token (api/openai_routes.py): a request that fails or
is cancelled before it gets its own status, which the SDKs raise on; one still queued at an idle ping, or
failing after its first token, keeps the 200 that went out, with the error object as its body. A stream
with no token still opens with the role's chunk; `stream` and `n` may be null, as OpenAI's schema allows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fake_backend import FakeBackend, Script, sluicegate_in_front
from tests.helpers import Stack

MODEL = "fake-model"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(models=[MODEL], default=Script.text("The ", "gate ", "holds."))


@pytest.fixture
def gate(fake: FakeBackend, redis_url: str) -> Iterator[Stack]:
    with sluicegate_in_front(fake, redis_url, sse_ping_seconds=5.0) as (stack, _):
        yield stack


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0, timeout=30)


def chat(stack: Stack, **body: Any) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body},
                      headers={"X-Session-Id": "errors"}, timeout=30)


def test_a_request_the_backend_refuses_is_its_status_and_an_sdk_error(fake: FakeBackend, gate: Stack) -> None:
    fake.default = Script(error_status=400, error_message="This model's maximum context length is 4096 tokens",
                          error_type="BadRequestError")
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(gate).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert "maximum context length" in str(raised.value)
    answer = chat(gate)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request" and error["code"] == 400 and "maximum context length" in error["message"]
    request_id = answer.headers["X-Request-Id"]  # the request was stored: its id still comes with the refusal
    assert httpx.get(f"{gate.base_url}/v1/requests/{request_id}").json()["status"] == "failed"


@pytest.mark.parametrize("status", [500, 401, 404])
def test_a_backend_failure_before_the_first_token_is_502(fake: FakeBackend, gate: Stack, status: int) -> None:
    """A backend's 401 or 404 is about Sluicegate's own call (its credentials, its model), not the caller's:
    a 502, never the SDK's AuthenticationError against the caller's key."""
    fake.default = Script(error_status=status, error_message="engine crashed")
    with pytest.raises(openai.InternalServerError):
        sdk(gate).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    answer = chat(gate)
    assert answer.status_code == 502 and answer.json()["error"]["type"] == "generation_failed"


def first_request_of(stack: Stack, session_id: str) -> str:
    """The id in the session's first event (its `queued` event), read from the session's stream once
    the session exists."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with httpx.stream("GET", f"{stack.base_url}/v1/sessions/{session_id}/events", timeout=10) as events:
            if events.status_code == 200:
                for line in events.iter_lines():
                    if line.startswith("data:"):
                        return str(orjson.loads(line[5:])["request_id"])
        time.sleep(0.02)
    raise AssertionError("no event")


def test_a_request_cancelled_before_its_first_token_is_409(fake: FakeBackend, gate: Stack) -> None:
    fake.default = Script.text("late", first_token_delay=4.0)
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(chat(gate)))
    caller.start()
    request_id = first_request_of(gate, "errors")
    assert httpx.delete(f"{gate.base_url}/v1/requests/{request_id}").status_code == 200
    caller.join(10)
    assert answers[0].status_code == 409 and answers[0].json()["error"]["type"] == "cancelled"
    assert answers[0].headers["X-Request-Id"] == request_id


def test_a_request_cancelled_after_its_first_token_keeps_its_200_and_ends_with_the_error(
        fake: FakeBackend, gate: Stack) -> None:
    """Its status went out with its first token: the body carries the error."""
    fake.default = Script.text("one ", "two", chunk_delay=3.0)
    with httpx.stream("POST", f"{gate.base_url}/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": MESSAGES}) as answer:
        assert answer.status_code == 200
        assert httpx.delete(f"{gate.base_url}/v1/requests/{answer.headers['X-Request-Id']}").status_code == 200
        body = orjson.loads(answer.read())
    assert body["error"]["type"] == "cancelled" and body["error"]["code"] == 409


def status_then_body(stack: Stack) -> tuple[float, dict[str, Any]]:
    """A non-streamed call: the seconds until its status came (a 200 with its request id), then its body."""
    started = time.monotonic()
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": MESSAGES}) as answer:
        assert answer.status_code == 200 and answer.headers["X-Request-Id"]
        waited = time.monotonic() - started
        return waited, orjson.loads(answer.read())


def test_a_request_with_no_first_token_by_an_idle_ping_gets_its_200_then_its_completion(
        fake: FakeBackend, redis_url: str) -> None:
    """No status is held past `--sse-ping-seconds`: a client learns its request id while it waits."""
    fake.default = Script.text("The ", "gate ", "holds.", first_token_delay=2.0)
    with sluicegate_in_front(fake, redis_url, sse_ping_seconds=0.3) as (stack, _):
        waited, body = status_then_body(stack)
    assert waited < 1.9  # before the backend's first token
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "The gate holds."


def test_a_first_token_slower_than_the_response_deadline_gets_its_200_in_time(
        fake: FakeBackend, redis_url: str) -> None:
    """With the default ping (15 s), a status held to the first token would meet the 5 s response deadline:
    a 503 that the SDK retries, each retry a request stored again. It goes out within 4 s instead."""
    fake.default = Script.text("The ", "gate ", "holds.", first_token_delay=6.0)
    with sluicegate_in_front(fake, redis_url, sse_ping_seconds=15.0) as (stack, _):
        waited, body = status_then_body(stack)
        assert waited < 5.5  # before the backend's first token
        assert body["choices"][0]["message"]["content"] == "The gate holds."
        assert len(fake.records) == 1  # stored and generated once


def test_a_prompt_answer_arrives_whole_with_its_200(gate: Stack) -> None:
    started = time.monotonic()
    answer = chat(gate)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "The gate holds."
    assert time.monotonic() - started < 5.0  # not held to the idle ping


def test_an_empty_streamed_answer_still_opens_with_its_role_chunk(fake: FakeBackend, gate: Stack) -> None:
    fake.default = Script(deltas=[], finish_reason="stop")
    with sdk(gate).chat.completions.stream(model=MODEL, messages=MESSAGES) as stream:  # type: ignore[arg-type]
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.role == "assistant" and final.choices[0].message.content == ""
    assert final.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("field", ["stream", "n"])
def test_null_stream_and_n_are_their_defaults(fake: FakeBackend, gate: Stack, field: str) -> None:
    answer = chat(gate, **{field: None})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "The gate holds."  # not streamed
    assert field == "stream" or field not in fake.records[-1].body  # a null n is not sent on
