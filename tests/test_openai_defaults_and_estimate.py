"""The budget of a call that gives none, and the input-token estimate of OpenAI message shapes.

- A chat call (or a native submit) that sends no max_tokens gets min(256, --max-tokens-limit): an operator who
  lowers the limit below 256 must not turn every such call into a 422 about a field it never sent. A max_tokens
  given above the limit is still that 422.
- The input estimate (the usage's prompt_tokens when the backend reports none, the fair-share charge at
  dispatch, chargeback) counts what a model reads: the text of `text` parts and a flat 85 per other part (not
  a base64 image's characters), and the name and arguments of tool calls (not "None" for their null content).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import pytest

from sluicegate.api.schemas import SubmitBody
from sluicegate.sessions.requests import NewRequest, estimate_tokens
from tests.helpers import Stack, call, fast_settings
from tests.openai_helpers import chat_stream

LIMIT = 100  # below the default budget, 256
MESSAGES = [{"role": "user", "content": "count to a hundred"}]
IMAGE = "data:image/png;base64," + base64.b64encode(os.urandom(30_000)).decode()  # 40 KB of characters


def request_of(messages: list[dict[str, Any]]) -> NewRequest:
    return NewRequest(session_id="s", priority=5, max_tokens=10, tenant="t", group="g", messages=messages)


@pytest.fixture
def low_limit_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, max_tokens_limit=LIMIT)).start(workers=1)
    yield running
    running.stop()


# ---- the default budget -----------------------------------------------------------------------------------

def test_a_chat_call_without_max_tokens_gets_the_limit_when_it_is_lower(low_limit_stack: Stack) -> None:
    code, reply = call("POST", f"{low_limit_stack.base_url}/v1/chat/completions", {"messages": MESSAGES})
    assert code == 200, reply  # old: 422 "max_tokens: at most 100 (--max-tokens-limit)"
    assert reply["usage"]["completion_tokens"] == LIMIT and reply["choices"][0]["finish_reason"] == "length"
    code, status = call("GET", f"{low_limit_stack.base_url}/v1/requests/{reply['id'].removeprefix('chatcmpl-')}")
    assert code == 200 and status["max_tokens"] == LIMIT


def test_a_streamed_chat_call_without_max_tokens_gets_the_limit(low_limit_stack: Stack) -> None:
    result = chat_stream(low_limit_stack.base_url, {"messages": MESSAGES})
    assert result.status == 200, result.body  # old: 422
    assert result.done and len(result.content_chunks) == LIMIT


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_chat_budget_given_above_the_limit_is_still_refused(low_limit_stack: Stack, field: str) -> None:
    code, reply = call("POST", f"{low_limit_stack.base_url}/v1/chat/completions",
                       {"messages": MESSAGES, field: LIMIT + 1})
    assert code == 422, reply
    assert reply["error"]["message"] == f"{field}: at most {LIMIT} (--max-tokens-limit)"  # the field sent


def test_a_chat_call_without_max_tokens_still_gets_256_under_the_default_limit(stack: Stack) -> None:
    code, reply = call("POST", f"{stack.base_url}/v1/chat/completions", {"messages": MESSAGES})
    assert code == 200, reply
    code, status = call("GET", f"{stack.base_url}/v1/requests/{reply['id'].removeprefix('chatcmpl-')}")
    assert code == 200 and status["max_tokens"] == 256


def test_the_submit_body_budget_is_the_default_within_the_limit() -> None:
    """SubmitBody.budget: what api/requests_routes.py `submit_body` is to give NewRequest (see the test below)."""
    assert SubmitBody.model_validate({"prompt": "hi"}).budget(LIMIT) == LIMIT
    assert SubmitBody.model_validate({"prompt": "hi"}).budget(32768) == 256
    assert SubmitBody.model_validate({"prompt": "hi", "max_tokens": 500}).budget(LIMIT) == 500  # then the 422
    assert SubmitBody.model_validate({"prompt": "hi", "max_tokens": 256}).budget(LIMIT) == 256


def test_a_native_submit_without_max_tokens_gets_the_limit_when_it_is_lower(low_limit_stack: Stack) -> None:
    code, reply = call("POST", f"{low_limit_stack.base_url}/v1/sessions/native-1/requests", {"prompt": "hi"})
    assert code == 202, reply  # before: 422 "max_tokens: at most 100 (--max-tokens-limit)"
    code, status = call("GET", f"{low_limit_stack.base_url}/v1/requests/{reply['request_id']}")
    assert code == 200 and status["max_tokens"] == LIMIT


def test_a_native_submit_above_the_limit_is_still_refused(low_limit_stack: Stack) -> None:
    code, reply = call("POST", f"{low_limit_stack.base_url}/v1/sessions/native-2/requests",
                       {"prompt": "hi", "max_tokens": LIMIT + 1})
    assert code == 422, reply


# ---- the input estimate -----------------------------------------------------------------------------------

def test_an_image_part_counts_a_flat_85_not_its_base64() -> None:
    text = "what is in this picture?"
    messages = [{"role": "user", "content": [{"type": "text", "text": text},
                                             {"type": "image_url", "image_url": {"url": IMAGE}}]}]
    assert request_of(messages).input_tokens == len(text) // 4 + 85  # old: about 10,000 (the part's repr)


def test_other_non_text_parts_count_the_same_flat_amount() -> None:
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "A" * 40_000}},
                                             {"type": "file", "file": {"file_data": "B" * 40_000}}]}]
    assert request_of(messages).input_tokens == 2 * 85


def test_tool_calls_count_their_name_and_arguments_not_a_null_content() -> None:
    arguments = "x" * 4000
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "lookup", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "the result"}]
    expected = (len("hi") + len("lookup") + len(arguments) + len("the result")) // 4
    assert request_of(messages).input_tokens == expected  # old: 3 ("hi" + "None" + "the result")


def test_a_legacy_function_call_counts_too() -> None:
    messages = [{"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "y" * 400}}]
    assert request_of(messages).input_tokens == 401 // 4  # old: 1 ("None")


def test_plain_string_contents_are_estimated_as_before() -> None:
    messages = [{"role": "system", "content": "short answers"}, {"role": "user", "content": "why queue requests?"},
                {"role": "assistant", "content": "so that"}]
    assert request_of(messages).input_tokens == estimate_tokens("".join(m["content"] for m in messages))


def test_the_usage_of_an_image_call_carries_the_estimate(stack: Stack) -> None:
    """The sim engine reports no usage: the done event's (and so the answer's) prompt_tokens is the estimate."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe it"},
                                             {"type": "image_url", "image_url": {"url": IMAGE}}]}]
    code, reply = call("POST", f"{stack.base_url}/v1/chat/completions", {"messages": messages, "max_tokens": 3})
    assert code == 200, reply
    assert reply["usage"]["prompt_tokens"] == len("describe it") // 4 + 85  # old: about 10,000
