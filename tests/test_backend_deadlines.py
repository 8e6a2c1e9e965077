"""Backend deadlines, attempts and prompt aborts, against the scripted fake backend (tests/fake_backend.py).

- `--backend-first-token-timeout`: a backend that sends only keep-alive comments is given up on, as a
  transient failure (the request runs again; it fails only after `--max-attempts` such calls).
- `--backend-idle-timeout`: likewise for silence between tokens; the request resumes from its tokens.
- `--max-attempts`: a backend that keeps cutting streams after some tokens ends the request with an
  `error` event and status `failed` after that many calls, every token written once.
- A cancel (`DELETE /v1/requests/{id}`) closes the backend stream within 100 ms of the DELETE's
  answer; a preemption closes it too.

Timings are tolerant (2 noisy cores) except the 100 ms close bound, which is the requirement.
"""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from tests.fake_backend import FakeBackend, Record, Script, sluicegate_in_front
from tests.helpers import SseEvent, Stack, call, sse, submit

MODEL = "fake-model"
MESSAGES = [{"role": "user", "content": "count to twenty"}]
WORDS = [f"n{i:02d} " for i in range(20)]
TEXT = "".join(WORDS)
DEADLINES = {"backend_first_token_timeout": 0.5, "backend_idle_timeout": 0.5}


def ask(stack: Stack, session: str, max_tokens: int = 100, **body: Any) -> str:
    code, reply = call("POST", f"{stack.base_url}/v1/sessions/{session}/requests",
                       {"messages": MESSAGES, "max_tokens": max_tokens, **body})
    assert code == 202, reply
    return str(reply["request_id"])


def events_of(stack: Stack, rid: str) -> list[SseEvent]:
    return list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=60))


def status_of(stack: Stack, rid: str) -> dict[str, Any]:
    code, status = call("GET", f"{stack.base_url}/v1/requests/{rid}")
    assert code == 200, status
    return status


def tokens_of(events: list[SseEvent]) -> tuple[list[int], str]:
    tokens = [e.data for e in events if e.event == "token"]
    return [t["index"] for t in tokens], "".join(t["text"] for t in tokens)


def names(events: list[SseEvent]) -> list[str]:
    return [e.event for e in events]


def test_first_token_timeout_is_a_transient_failure(redis_url: str) -> None:
    fake = FakeBackend(models=[MODEL], default=Script.text(*WORDS))
    fake.push(Script.text(*WORDS, stall_after=0, keepalive=0.1))  # the first call: keep-alives only
    with sluicegate_in_front(fake, redis_url, max_attempts=3, **DEADLINES) as (stack, _):
        rid = ask(stack, "ftt")
        events = events_of(stack, rid)
    assert names(events)[-1] == "done", names(events)
    assert tokens_of(events) == (list(range(20)), TEXT)  # the second call's answer, whole
    preempted = [e.data for e in events if e.event == "preempted"]
    assert len(preempted) == 1 and preempted[0]["reason"] == "backend_error", preempted
    silent, second = fake.records
    assert silent.chunks_sent == 0 and silent.keepalives_sent >= 3  # the comments did not count as activity
    assert silent.closed_at is not None, silent  # Sluicegate closed it
    assert 0.45 <= silent.closed_at - silent.arrived_at < 5, silent.closed_at - silent.arrived_at
    assert second.outcome == "complete" and not second.continued  # no token yet: a fresh call


def test_idle_timeout_between_tokens_is_a_transient_failure(redis_url: str) -> None:
    fake = FakeBackend(models=[MODEL], default=Script.text(*WORDS))
    fake.push(Script.text(*WORDS, stall_after=3, keepalive=0.1))  # 3 tokens, then keep-alives only
    with sluicegate_in_front(fake, redis_url, max_attempts=3, **DEADLINES) as (stack, _):
        rid = ask(stack, "idle")
        events = events_of(stack, rid)
    assert names(events)[-1] == "done", names(events)
    assert tokens_of(events) == (list(range(20)), TEXT)  # every token once, in order
    preempted = [e.data for e in events if e.event == "preempted"]
    assert len(preempted) == 1 and preempted[0]["reason"] == "backend_error" and preempted[0]["index"] == 3
    stalled, resumed = fake.records
    assert stalled.chunks_sent == 3 and stalled.keepalives_sent >= 3 and stalled.closed_at is not None
    assert stalled.first_chunk_at is not None
    assert 0.45 <= stalled.closed_at - stalled.first_chunk_at < 5  # 0.5 s after the 3rd token (sent at once)
    assert resumed.continued and resumed.prefix_chunks == 3 and resumed.outcome == "complete"
    assert events[-1].data["finish_reason"] == "stop"


def test_a_backend_that_only_keeps_alive_fails_the_request_after_max_attempts(redis_url: str) -> None:
    fake = FakeBackend(models=[MODEL], default=Script.text(*WORDS, stall_after=0, keepalive=0.1))
    with sluicegate_in_front(fake, redis_url, max_attempts=2, **DEADLINES) as (stack, _):
        rid = ask(stack, "silent")
        events = events_of(stack, rid)
        status = status_of(stack, rid)
    assert names(events)[-1] == "error" and tokens_of(events) == ([], "")
    assert status["status"] == "failed" and status["tokens"] == 0
    records = fake.records
    assert len(records) == 2 and all(r.closed_at is not None and r.chunks_sent == 0 for r in records)


def test_max_attempts_caps_a_backend_that_keeps_cutting_streams(redis_url: str) -> None:
    fake = FakeBackend(models=[MODEL], default=Script.text(*WORDS, cut_after=2))  # every call: 2 tokens, then cut
    with sluicegate_in_front(fake, redis_url, max_attempts=3, **DEADLINES) as (stack, _):
        rid = ask(stack, "cut")
        events = events_of(stack, rid)
        status = status_of(stack, rid)
        # The same through the SDK, streamed: the error ends the stream as an APIError.
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.APIError):
            for _ in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):  # type: ignore
                pass
    assert names(events).count("preempted") == 2 and names(events)[-1] == "error", names(events)
    assert tokens_of(events) == (list(range(6)), "".join(WORDS[:6]))  # 3 calls x 2 tokens, each once
    assert status["status"] == "failed" and status["tokens"] == 6
    assert status["error"] == events[-1].data["message"]
    calls = fake.records[:3]
    assert [c.prefix_chunks for c in calls] == [0, 2, 4] and all(c.outcome == "cut" for c in calls)
    assert len(fake.records) == 6  # 3 more for the SDK's request: no 4th attempt for either


def test_a_non_streamed_request_failed_after_its_first_token_is_its_own_status(redis_url: str) -> None:
    """The non-streamed answer's status waits for the request's end, as a backend's own does: a failure
    after two tokens is a 502 with the OpenAI error object and X-Request-Id, which the SDK raises as an
    InternalServerError (a 200 with the error as its body would have read as a completion with no choices)."""
    fake = FakeBackend(models=[MODEL], default=Script.text(*WORDS, cut_after=2))
    with sluicegate_in_front(fake, redis_url, max_attempts=1) as (stack, _):
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        answer = raised.value.response
        error = answer.json()["error"]
        assert answer.status_code == 502 and error["type"] == "generation_failed"
        assert error["code"] == "generation_failed"  # a string, as OpenAI's schema and ErrorDetail say
        rid = answer.headers["x-request-id"]
        assert "after 2 tokens" in error["message"] and status_of(stack, rid)["status"] == "failed"


# ---- a cancel or a preemption aborts the backend call at once -------------------------------------------
def wait_record(fake: FakeBackend, check: Any, what: str) -> Record:
    return fake.wait_until(lambda rs: next((r for r in rs if check(r)), None), what=what)


@pytest.mark.parametrize("phase", ["streaming", "before_first_token"])
def test_delete_closes_the_backend_stream_within_100_ms(redis_url: str, phase: str) -> None:
    script = (Script.text(*[f"w{i} " for i in range(2000)], chunk_delay=0.02) if phase == "streaming"
              else Script.text("late", stall_after=0, keepalive=0.05))
    fake = FakeBackend(models=[MODEL], default=script)
    with sluicegate_in_front(fake, redis_url, backend_first_token_timeout=60.0) as (stack, _):
        for round_ in range(3):  # a few times: the bound holds every time, not once
            rid = ask(stack, f"del-{round_}", max_tokens=5000)
            (record,) = fake.wait_for_requests(round_ + 1)[round_:]
            fake.wait_until(lambda _, r=record: r.chunks_sent >= 3 if phase == "streaming" else r.keepalives_sent >= 2,
                            what="the backend call to be under way")
            code, reply = call("DELETE", f"{stack.base_url}/v1/requests/{rid}")
            answered = time.monotonic()
            assert code == 200, reply
            fake.wait_until(lambda _, r=record: r.ended_at, timeout=5, what="the backend stream to close")
            assert record.outcome == "disconnected" and record.closed_at is not None, record
            assert record.closed_at - answered < 0.1, f"closed {record.closed_at - answered:.3f} s after the DELETE"
            assert status_of(stack, rid)["status"] == "cancelled"
        assert len(fake.records) == 3  # a cancelled request is not called again


def test_preemption_closes_the_backend_stream(redis_url: str) -> None:
    def by_prompt(body: dict[str, Any]) -> Script:
        if body["messages"][0]["content"] == MESSAGES[0]["content"]:
            return Script.text(*[f"w{i} " for i in range(2000)], chunk_delay=0.02)
        return Script.text("ok")

    fake = FakeBackend(models=[MODEL], choose=by_prompt)
    with sluicegate_in_front(fake, redis_url, slots=1) as (stack, _):
        rid = ask(stack, "low", max_tokens=5000, priority="low")
        # Past the min-run quantum (--preempt-min-run-ms, 50 ms), so that the submit preempts at once.
        low = wait_record(fake, lambda r: r.chunks_sent >= 8, what="the low request to stream")
        submit(stack.base_url, "high", prompt="hi", max_tokens=3, priority="critical")
        submitted = time.monotonic()
        fake.wait_until(lambda _: low.ended_at, timeout=5, what="the preempted stream to close")
        assert low.outcome == "disconnected" and low.closed_at is not None
        assert low.closed_at - submitted < 0.5, low.closed_at - submitted
        resumed = wait_record(fake, lambda r: r.continued, what="the low request to resume")
        assert 1 <= resumed.prefix_chunks <= low.chunks_sent  # resumed from the tokens written before
        assert call("DELETE", f"{stack.base_url}/v1/requests/{rid}")[0] == 200
