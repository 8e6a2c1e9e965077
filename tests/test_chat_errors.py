"""The OpenAI front's statuses and shapes where OpenAI's SDKs depend on them.

A non-streamed call's status waits for its request's end (api/openai_routes.py), as a backend's own
does: a request that fails or is cancelled, before its first token or after, however long it waited,
gets its own status, which the SDKs raise on (they read no error out of a 200's body). A stream with no
token still opens with the role's chunk; `stream` and `n` may be null, as OpenAI's schema allows.
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
    assert error["type"] == error["code"] == "invalid_request" and "maximum context length" in error["message"]
    request_id = answer.headers["X-Request-Id"]  # the request was stored: its id still comes with the refusal
    assert httpx.get(f"{gate.base_url}/v1/requests/{request_id}").json()["status"] == "failed"


def test_a_streamed_request_the_backend_refuses_is_its_status_and_the_sdks_own_error(fake: FakeBackend,
                                                                                    gate: Stack) -> None:
    """Streamed too, the status waits for the first event that tells: a context too long is the SDK's
    BadRequestError, as from the backend itself (code that trims the history and calls again catches it),
    not a 200 whose stream then ends with an error (a bare APIError)."""
    fake.default = Script(error_status=400, error_message="This model's maximum context length is 4096 tokens",
                          error_type="BadRequestError")
    with pytest.raises(openai.BadRequestError) as raised:
        for _ in sdk(gate).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):  # type: ignore
            pass
    assert "maximum context length" in str(raised.value)
    assert raised.value.response.headers["X-Request-Id"]


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


def test_a_request_cancelled_after_its_first_token_is_409_too(fake: FakeBackend, gate: Stack) -> None:
    """Its status waits for its end: a failure after the first token is the SDK's error too, not a 200
    whose body the SDK would take for a completion with no choices."""
    fake.default = Script.text("one ", "two", chunk_delay=3.0)
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(chat(gate)))
    caller.start()
    request_id = first_request_of(gate, "errors")
    wait_tokens(gate, request_id, 1)
    assert httpx.delete(f"{gate.base_url}/v1/requests/{request_id}").status_code == 200
    caller.join(10)
    assert answers[0].status_code == 409 and answers[0].json()["error"]["type"] == "cancelled"
    assert answers[0].headers["X-Request-Id"] == request_id


def wait_tokens(stack: Stack, request_id: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{stack.base_url}/v1/requests/{request_id}").json()["tokens"] < n:
        assert time.monotonic() < deadline, "no token"
        time.sleep(0.05)


def test_a_request_cancelled_after_the_response_deadline_is_409(fake: FakeBackend, redis_url: str) -> None:
    """Stored, the request may take longer than the 5-s response deadline (api/deadline.py) before its
    status: a cancel 6 s in is its 409, never a 503 (which the SDK would retry, storing it again) nor a
    200 with the error as its body."""
    fake.default = Script.text("late", first_token_delay=8.0)
    with sluicegate_in_front(fake, redis_url, sse_ping_seconds=1.0) as (stack, _):
        answers: list[httpx.Response] = []
        caller = threading.Thread(target=lambda: answers.append(chat(stack)))
        caller.start()
        request_id = first_request_of(stack, "errors")
        time.sleep(6.0)
        assert httpx.delete(f"{stack.base_url}/v1/requests/{request_id}").status_code == 200
        caller.join(10)
    assert answers[0].status_code == 409 and answers[0].json()["error"]["type"] == "cancelled"


def test_a_call_queued_behind_its_session_past_the_response_deadline_is_generated_once(
        fake: FakeBackend, redis_url: str) -> None:
    """Two calls in one session: the second waits behind the first, whose tokens come for 6 s (past the 5-s
    response deadline; its events keep the session's stream busy, so no idle ping comes either). Each gets
    its 200 and its whole completion, and the backend generates each once: no 503, which the SDK would
    retry, storing the request again."""
    fake.default = Script.text(*["w "] * 12, chunk_delay=0.5)
    with sluicegate_in_front(fake, redis_url, sse_ping_seconds=15.0) as (stack, _):
        answers: list[httpx.Response] = []
        callers = [threading.Thread(target=lambda: answers.append(chat(stack))) for _ in range(2)]
        for caller in callers:
            caller.start()
            time.sleep(0.3)
        for caller in callers:
            caller.join(30)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert all(a.json()["choices"][0]["message"]["content"] == "w " * 12 for a in answers)
        assert len(fake.records) == 2  # stored and generated once each


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


def test_the_sdk_does_not_call_again_a_stored_request_that_failed_or_was_cancelled(fake: FakeBackend,
                                                                                   gate: Stack) -> None:
    """OpenAI's SDKs retry a 409 and a 5xx by default, each retry a new request: a stored request's error
    answer says `x-should-retry: false`, so a cancelled call is not submitted again, nor a failed one
    generated again."""
    client = openai.OpenAI(base_url=f"{gate.base_url}/v1", api_key="x", timeout=30)  # default retries (2)
    fake.default = Script.text("one ", "two", chunk_delay=3.0)
    raised: list[Exception] = []

    def ask() -> None:
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers={"X-Session-Id": "errors"})
        except openai.APIStatusError as error:
            raised.append(error)

    caller = threading.Thread(target=ask)
    caller.start()
    request_id = first_request_of(gate, "errors")
    wait_tokens(gate, request_id, 1)
    assert httpx.delete(f"{gate.base_url}/v1/requests/{request_id}").status_code == 200
    caller.join(20)
    assert isinstance(raised[0], openai.ConflictError) and len(fake.records) == 1  # asked once
    fake.default = Script(error_status=500, error_message="engine crashed")  # failed, streamed: a 502
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert failed.value.status_code == 502 and failed.value.response.headers["x-should-retry"] == "false"
