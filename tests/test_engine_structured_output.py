"""A run with structured output (response_format json_object/json_schema, the engines' guided_* and grammar
params) is never resumed: an engine constrains only what it generates, so output continued from a partial
one does not match (README "Tool calls and resumes"). It is pinned at its first token, and fails, saying
why, when its backend fails or its worker is lost."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import redis

from sluicegate.sessions.keys import group_prefix
from sluicegate.sessions.runs import RunSpec
from sluicegate.workers.runner import Run, structured
from tests.fake_backend import FakeBackend, Script, sluicegate_in_front

MESSAGES = [{"role": "user", "content": "the city, as JSON"}]
JSON_PIECES = ('{"city"', ': "Par', 'is"}')


def ask(base_url: str) -> str:
    """A non-streamed JSON-mode call through the OpenAI SDK; its content."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=50,  # type: ignore[arg-type]
                                           response_format={"type": "json_object"})
    return str(reply.choices[0].message.content)


def test_structured_output_cut_by_the_backend_fails_instead_of_being_continued(redis_url: str) -> None:
    """Continued, it was '{"city": "Par' + what the engine generated from its start state: not JSON."""
    fake = FakeBackend(models=["m"], default=Script.text(*JSON_PIECES, cut_after=2))
    with sluicegate_in_front(fake, redis_url) as (stack, _), \
            pytest.raises(openai.APIError, match="streamed structured output, which no engine can continue") as failed:
        ask(stack.base_url)
    assert len(fake.records) == 1  # never continued
    assert "backend stream broke after 2 tokens" in str(failed.value)  # and what broke it, in the engine's words


def test_structured_output_is_pinned_at_its_first_token(redis_url: str, r: redis.Redis) -> None:
    """Pinned, it is never preempted (a preemption would resume it by continuation)."""
    fake = FakeBackend(models=["m"], default=Script.text(*JSON_PIECES, chunk_delay=0.3))
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0, timeout=30)
        with client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=50, stream=True,  # type: ignore
                                            response_format={"type": "json_object"}) as stream:
            first = next(c for c in stream if c.choices and c.choices[0].delta.content)
            assert first.choices[0].delta.content == JSON_PIECES[0]
            pinned = r.smembers(group_prefix("default") + "pin")
            assert [key.split("|")[1] for key in pinned] == ["1"], pinned  # the run's first attempt
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "".join(JSON_PIECES[1:])


def test_a_structured_run_resumed_after_its_worker_was_lost_fails_at_once() -> None:
    """A pinned run whose worker was lost is taken again from its tokens so far: it fails, the engine not called."""
    run = RunSpec(request_id="r", attempt="2", session_id="s", group="default", tenant="t", priority=5, max_tokens=9,
                  start_index=2, input_kind="m", input_text=json.dumps(MESSAGES), params={"guided_regex": "[a-z]+"})
    outcome = asyncio.run(Run(None, None, run).execute('{"city": "Par'))  # type: ignore[arg-type]
    assert outcome.kind == "engine_error" and not outcome.transient
    assert "streamed structured output" in outcome.detail
    assert structured({"response_format": {"type": "json_schema", "json_schema": {}}})
    assert not structured({"response_format": {"type": "text"}, "guided_json": None, "temperature": 0})
