"""The backend's usage reaches the caller as the backend sent it (README, "OpenAI compatibility", `usage`:
"passed through ... including its `*_details`"): in the streamed answer's usage chunk, the non-streamed
answer, the request's `done` event and GET /v1/requests/{id}. The run's end once re-encoded it with the
store's Lua cjson, which cut its numbers to 14 significant digits (0.1234567890123456 -> 0.12345678901235),
wrote integers from 1e14 as exponent floats (123456789012345678 -> 1.2345678901235e+17) and turned empty
arrays into objects. Where Sluicegate changes the usage (a continuation resume moves the output so far back
to `completion_tokens` and caps the prompt details at the prompt: workers/engines/openai.py
`usage_as_uninterrupted`), only those counts change."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests import fake_backend
from tests.fake_backend import FakeBackend, Script, sluicegate_in_front
from tests.helpers import call, sse
from tests.openai_helpers import chat_stream

MODEL = "m"
MESSAGES = [{"role": "user", "content": "x"}]
USAGE: dict[str, Any] = {
    "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
    "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": None},
    "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": []},
    "cost": 0.1234567890123456, "big": 123456789012345678, "tags": [], "nested": {"empty": {}, "list": [[], 1.5]},
}
DELTAS = [{"content": "a"}, {"content": "b"}, {"content": "c"}]


def request_id(completion_id: str) -> str:
    return completion_id.removeprefix("chatcmpl-")


def stored_usages(base_url: str, rid: str) -> tuple[Any, Any]:
    """The `done` event's usage and GET /v1/requests/{id}'s, both parsed by Python's json (exact)."""
    done = [e for e in sse(base_url, f"/v1/requests/{rid}/events", until=lambda e: e.event == "done", timeout=30)
            if e.event == "done"]
    assert done, "no done event"
    code, view = call("GET", f"{base_url}/v1/requests/{rid}")
    assert code == 200, view
    return done[0].data["usage"], view.get("usage")


def assert_exact(usage: Any, expected: dict[str, Any]) -> None:
    assert usage == expected
    assert type(usage["big"]) is int and usage["big"] == 123456789012345678  # not 1.2345678901235e+17
    assert usage["cost"] == 0.1234567890123456  # not 0.12345678901235
    assert usage["tags"] == [] and usage["completion_tokens_details"]["accepted_prediction_tokens"] == []


def test_the_backends_usage_comes_back_exactly(redis_url: str) -> None:
    fake = FakeBackend(models=[MODEL], default=Script(deltas=DELTAS))
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        fake.push(Script(deltas=DELTAS, usage=USAGE))
        answer = httpx.post(f"{stack.base_url}/v1/chat/completions",
                            json={"model": MODEL, "messages": MESSAGES}, timeout=30)
        assert answer.status_code == 200, answer.text
        body = json.loads(answer.text)
        assert_exact(body["usage"], USAGE)
        for usage in stored_usages(stack.base_url, request_id(body["id"])):
            assert_exact(usage, USAGE)

        for include_usage in (True, False):
            fake.push(Script(deltas=DELTAS, usage=USAGE))
            raw = chat_stream(stack.base_url, {"model": MODEL, "messages": MESSAGES,
                                               "stream_options": {"include_usage": include_usage}})
            assert raw.status == 200 and raw.done, raw.body
            assert raw.text == "abc"
            # include_usage: a last chunk with no choices; otherwise on the finish chunk (chat_render.py)
            assert_exact(raw.chunks[-1]["usage"], USAGE)
            for usage in stored_usages(stack.base_url, request_id(raw.chunks[0]["id"])):
                assert_exact(usage, USAGE)


def test_a_continued_runs_usage_changes_only_the_counts_sluicegate_moves_back(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend cut after 2 of 3 tokens; the continuation's call counts them as prompt (14) and reports its
    own details over that prompt (cached_tokens 14). Moved back: prompt 12, completion 3, cached_tokens capped
    at 12; every other value as the backend sent it."""
    def usage(plan: Any, sent: int) -> dict[str, Any]:  # the fake's usage, its details kept on a continuation
        reported = json.loads(json.dumps(plan.script.usage))
        if plan.prefix_chunks:
            prompt = reported["prompt_tokens"] + plan.prefix_chunks
            reported.update(prompt_tokens=prompt, completion_tokens=sent, total_tokens=prompt + sent)
            reported["prompt_tokens_details"]["cached_tokens"] = prompt
        return reported

    monkeypatch.setattr(fake_backend.Plan, "usage", usage)
    fake = FakeBackend(models=[MODEL])
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        fake.push(Script(deltas=DELTAS, cut_after=2, usage=USAGE), Script(deltas=DELTAS, usage=USAGE))
        raw = chat_stream(stack.base_url, {"model": MODEL, "messages": MESSAGES,
                                           "stream_options": {"include_usage": True}})
        assert raw.status == 200 and raw.done, raw.body
        first, resumed = fake.records
        assert first.outcome == "cut" and resumed.continued
        expected = {**USAGE, "prompt_tokens_details": {"cached_tokens": 12, "audio_tokens": None}}
        assert_exact(raw.chunks[-1]["usage"], expected)
        for stored in stored_usages(stack.base_url, request_id(raw.chunks[0]["id"])):
            assert_exact(stored, expected)
