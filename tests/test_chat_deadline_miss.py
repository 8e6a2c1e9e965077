"""A chat call asks for `on_deadline_miss: fail` with the `X-On-Deadline-Miss: run|fail` header (next to
`X-Deadline-Ms`), as a native submit does with its body field; a bad value is the route's 422. A body field
`on_deadline_miss` is not the engine's: it never reaches the backend's params."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def chat(base: str, body: dict[str, Any], headers: dict[str, str], timeout: float = 15) -> tuple[int, dict]:
    """A non-streamed chat call (its answer waits for the request's end), bounded by `timeout`."""
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_x_on_deadline_miss_fail_ends_a_chat_call_at_its_deadline(redis_url: str) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0)  # no worker: only the deadline can end it
    try:
        code, body = chat(stack.base_url, CHAT, {"X-Deadline-Ms": "300", "X-On-Deadline-Miss": "fail"})
        assert code == 502 and body["error"]["message"].startswith("deadline_exceeded"), (code, body)
    finally:
        stack.stop()


def test_the_header_sets_the_requests_fail_flag(redis_url: str) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=1)
    try:
        base = stack.base_url
        for given, flag in (("fail", "fail"), (" Fail ", "fail"), ("run", "run"), (None, "run")):
            headers = {"X-Deadline-Ms": "60000"} | ({} if given is None else {"X-On-Deadline-Miss": given})
            code, reply = chat(base, CHAT, headers)
            assert code == 200, reply
            view = call("GET", f"{base}/v1/requests/{reply['id'].removeprefix('chatcmpl-')}")[1]
            assert view["on_deadline_miss"] == flag, (given, view)
    finally:
        stack.stop()


def test_a_body_field_on_deadline_miss_is_not_sent_to_the_backend(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=1)
    try:
        code, reply = chat(stack.base_url, {**CHAT, "on_deadline_miss": "fail", "temperature": 0.5}, {})
        assert code == 200, reply
        params = json.loads(r.hget(keys.request(reply["id"].removeprefix("chatcmpl-")), "pa"))
        assert params == {"temperature": 0.5}
    finally:
        stack.stop()


@pytest.mark.parametrize("bad", ["panic", "1", "fail,run"])
def test_a_bad_x_on_deadline_miss_is_422_and_stores_nothing(redis_url: str, r: redis.Redis, bad: str) -> None:
    stack = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)
    try:
        code, body = chat(stack.base_url, CHAT, {"X-On-Deadline-Miss": bad, "X-Session-Id": "bad-miss"}, timeout=5)
        assert code == 422 and "X-On-Deadline-Miss" in body["error"]["message"], body
        assert r.llen(keys.session_queue("bad-miss")) == 0
    finally:
        stack.stop()
