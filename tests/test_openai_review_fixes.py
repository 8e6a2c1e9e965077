"""The OpenAI-compatible front's review (fix-openai), findings 1-3.

1. An integer outside 64 bits inside a message (a field of it, a content part's) was stored with json.dumps,
   read back by the worker's orjson as a float and sent to the backend changed (`1e+23`), with a 200: it is a
   422 naming the field (`messages[0].x`), on the chat route and the native submit, as the same value in the
   params is, with nothing stored and no backend call.
2. A `max_completion_tokens` above `--max-tokens-limit` was refused as `max_tokens: at most ...`, a field the
   caller did not send: the 422 names the field that gave the budget.
3. `n: true` was taken for 1 (Python's True == 1), though only 1 or null is accepted; an empty `X-Priority` was
   a 422 where an empty X-Tenant, X-Group or X-Session-Id is the default: it is the default priority (5).
"""

from __future__ import annotations

from typing import Any

import httpx
import redis

from tests.fake_backend import FakeBackend, Script, sluicegate_in_front
from tests.helpers import Stack, call
from tests.openai_helpers import chat_stream

MODEL = "fake-model"
BIG = 99999999999999999999999  # the reviewer's: json.dumps keeps it, orjson reads it back as 1e+23
LIMIT = 32768  # the default --max-tokens-limit


def assert_refused(status: int, body: Any, field: str) -> None:
    assert status == 422, (status, body)
    error = body["error"]
    assert error["type"] == "invalid_request" and error["message"].startswith(f"{field}: "), error
    assert "64 bits" in error["message"], error


def nothing_stored(r: redis.Redis) -> None:
    assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == [], "a refused call left state behind"


# ---- 1. an integer past 64 bits in a message ------------------------------------------------------------


def test_an_integer_outside_64_bits_in_a_message_is_a_422_naming_it_on_the_chat_route(redis_url: str,
                                                                                        r: redis.Redis) -> None:
    fake = FakeBackend(models=[MODEL], default=Script.text("a", "b"))
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        url = f"{stack.base_url}/v1/chat/completions"
        # the reviewer's raw body (old: 200, the backend sent "x": 1e+23)
        status, body = call("POST", url, raw=b'{"messages":[{"role":"user","content":"a","x":' + str(BIG).encode()
                            + b"}]}")
        assert_refused(status, body, "messages[0].x")
        status, body = call("POST", url, {"model": MODEL, "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "text", "text": "b", "n": -(2**63) - 1}]}]})
        assert_refused(status, body, "messages[1].content[0].n")
        raw = chat_stream(stack.base_url, {"model": MODEL, "messages": [
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "index": 2**64,
                                                                   "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}]})
        assert_refused(raw.status, raw.body, "messages[0].tool_calls[0].index")
        nothing_stored(r)
        assert fake.records == []
        # the edges of what orjson writes still go through, to the backend unchanged
        sent = [{"role": "user", "content": "a", "x": 2**64 - 1, "y": -(2**63)}]
        status, body = call("POST", url, {"model": MODEL, "messages": sent})
        assert status == 200, body
        assert fake.records[-1].body["messages"] == sent


def test_an_integer_outside_64_bits_in_a_message_is_a_422_naming_it_on_the_native_submit(redis_url: str,
                                                                                         r: redis.Redis) -> None:
    fake = FakeBackend(models=[MODEL], default=Script.text("a", "b"))
    with sluicegate_in_front(fake, redis_url) as (stack, _):
        url = f"{stack.base_url}/v1/sessions/big-msg/requests"
        # the reviewer's (old: 202, and the backend sent "n": 1e+23)
        status, body = call("POST", url, raw=b'{"messages":[{"role":"user","content":"x","n":' + str(BIG).encode()
                            + b"}]}")
        assert_refused(status, body, "messages[0].n")
        status, body = call("POST", url, {"messages": [{"role": "user", "content": "x", "meta": {"k": [1, 2**64]}}],
                                          "max_tokens": 2})
        assert_refused(status, body, "messages[0].meta.k[1]")
        nothing_stored(r)
        assert fake.records == []
        sent = [{"role": "user", "content": "x", "meta": {"k": [1, 2**64 - 1]}}]
        status, body = call("POST", url, {"messages": sent, "max_tokens": 2})
        assert status == 202, body
        fake.wait_for_requests(1)
        assert fake.records[-1].body["messages"] == sent


# ---- 2. the budget field named as sent ----------------------------------------------------------------


def test_a_budget_above_the_limit_is_refused_naming_the_field_sent(stack: Stack) -> None:
    url = f"{stack.base_url}/v1/chat/completions"
    messages = [{"role": "user", "content": "x"}]
    for fields, named in (({"max_completion_tokens": 10**6}, "max_completion_tokens"),
                          ({"max_tokens": 10**6}, "max_tokens"),
                          # both: max_completion_tokens is the one used (and the one refused)
                          ({"max_tokens": 10, "max_completion_tokens": 10**6}, "max_completion_tokens")):
        status, body = call("POST", url, {"messages": messages, **fields})
        assert status == 422, body
        # old, the first: "max_tokens: at most 32768 (--max-tokens-limit)"
        assert body["error"]["message"] == f"{named}: at most {LIMIT} (--max-tokens-limit)", (fields, body)
    status, body = call("POST", f"{stack.base_url}/v1/sessions/mt/requests", {"prompt": "x", "max_tokens": 10**6})
    assert status == 422 and body["error"]["message"] == f"max_tokens: at most {LIMIT} (--max-tokens-limit)", body


# ---- 3. n: true, and an empty X-Priority ------------------------------------------------------------------


def test_n_true_is_refused_as_any_n_but_1(stack: Stack) -> None:
    url = f"{stack.base_url}/v1/chat/completions"
    messages = [{"role": "user", "content": "x"}]
    for n in (True, False, 2):
        status, body = call("POST", url, {"messages": messages, "max_tokens": 2, "n": n})
        assert status == 422, (n, status, body)  # old, true: 200
        assert body["error"]["message"] == "n: only 1 is supported", body
    for n in (1, None):
        status, body = call("POST", url, {"messages": messages, "max_tokens": 2, "n": n})
        assert status == 200, (n, body)


def test_an_empty_x_priority_is_the_default_priority(stack: Stack) -> None:
    url = f"{stack.base_url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    # (a blank one cannot be sent: HTTP trims it to this one)
    reply = httpx.post(url, json=body, headers={"X-Priority": "", "X-Tenant": "", "X-Group": ""}, timeout=30)
    assert reply.status_code == 200, reply.text  # old: 422 "X-Priority: priority must be 0..9 or low|normal|..."
    status, view = call("GET", f"{stack.base_url}/v1/requests/{reply.headers['x-request-id']}")
    assert status == 200 and view["priority"] == 5 and view["tenant"] == "default", view
    reply = httpx.post(url, json=body, headers={"X-Priority": "x"}, timeout=30)
    assert reply.status_code == 422 and reply.json()["error"]["message"].startswith("X-Priority: "), reply.text
