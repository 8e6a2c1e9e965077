"""A non-streamed chat answer assembled from backend deltas of unusual but valid shapes: a tool call whose
`index` is null (mistral.rs sent it so) or whose `function` is no object, and the legacy `function_call`
streamed in pieces. The answer was a 500 (`int(None)`), which the OpenAI SDK retries: each retry a new
stored request generated again; and `function_call` kept only its last piece. Real stack, scripted backend."""

from __future__ import annotations

import openai

from sluicegate.api.chat_render import merge_tool_calls
from tests.fake_backend import FakeBackend, Script, sluicegate_in_front

MODEL = "fake-model"
MESSAGES = [{"role": "user", "content": "the weather?"}]


def test_a_tool_call_with_a_null_index_is_answered_once_and_whole(redis_url: str) -> None:
    call = {"index": None, "id": "c1", "type": "function", "function": {"name": "get_w", "arguments": "{}"}}
    fake = FakeBackend(models=[MODEL], default=Script(deltas=[{"content": "x"}, {"tool_calls": [call]}],
                                                      finish_reason="tool_calls"))
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", timeout=30)  # the SDK's retries on
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        assert len(fake.records) == 1  # generated once
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and [(c.id, c.function.name, c.function.arguments) for c in calls] == \
        [("c1", "get_w", "{}")]  # type: ignore[union-attr]


def test_the_legacy_function_call_is_joined_from_its_pieces(redis_url: str) -> None:
    pieces = [{"function_call": {"name": "get_w", "arguments": ""}}, {"function_call": {"arguments": "{\"city\""}},
              {"function_call": {"arguments": ": \"Paris\"}"}}]
    fake = FakeBackend(models=[MODEL], default=Script(deltas=pieces, finish_reason="function_call"))
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", timeout=30, max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    called = reply.choices[0].message.function_call
    assert called is not None and (called.name, called.arguments) == ("get_w", '{"city": "Paris"}')


def test_a_function_that_is_no_object_adds_nothing() -> None:
    calls: dict[int, dict] = {}
    merge_tool_calls(calls, [{"index": 0, "id": "c1", "function": "oops"}, {"index": True, "function": {"name": "f"}}])
    assert calls[0]["id"] == "c1" and calls[0]["function"]["name"] == ""
    assert calls[1]["function"]["name"] == "f"  # a bool is no index: the next call


def test_the_python_client_reads_a_failures_status() -> None:
    """An error object inside a 200 stream names its type as `code` now (a string) and its status as `status`:
    the client gives the failure's status, and reads the integer code older servers send."""
    from sluicegate.client.errors import _body_error

    failed = {"type": "generation_failed", "message": "m"}
    too_long = {"type": "invalid_request", "message": "m", "code": "invalid_request"}
    for payload, status in (({"error": {**failed, "code": "generation_failed", "status": 502}}, 502),
                            ({"error": {**too_long, "status": 413}}, 413),  # the backend's own refusal
                            ({"error": {"type": "cancelled", "message": "m", "code": "cancelled", "status": 409}}, 409),
                            ({"error": {**failed, "code": 502}}, 502)):
        error = _body_error(payload, "r1")
        assert error is not None and (error.status, error.code, error.request_id) == \
            (status, payload["error"]["type"], "r1")
