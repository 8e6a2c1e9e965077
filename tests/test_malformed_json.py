"""A body that is not valid JSON is a 422 whose message says so, what the parser found and where: not the
parser's character offset shown as if it were a field ("15: JSON decode error"). On the submit (the hot
path hands such a body to FastAPI; FastAPI's route) and the chat route (which parses its own body)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Stack, call, fast_settings

HOT = {"content-type": "application/json"}  # api/hot_path.py
ROUTED = {"content-type": "application/vnd.api+json"}  # FastAPI's route


@pytest.fixture
def api(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize(("raw", "what"), [
    (b'{"prompt": "x",}', "Expecting property name enclosed in double quotes at character 15"),
    (b"{bad", "Expecting property name enclosed in double quotes at character 1"),
    (b'{"prompt": "x"} x', "Extra data at character 16"),
])
def test_a_submit_that_is_not_json_says_what_and_where(api: Stack, raw: bytes, what: str) -> None:
    url = f"{api.base_url}/v1/sessions/bad-json/requests"
    hot = call("POST", url, raw=raw, headers=HOT)
    routed = call("POST", url, raw=raw, headers=ROUTED)
    assert hot == routed == (422, {"error": {"type": "invalid_request",
                                             "message": f"the body is not valid JSON: {what}"}}), (hot, routed)


def test_a_chat_call_that_is_not_json_says_what_and_where(api: Stack) -> None:
    code, reply = call("POST", f"{api.base_url}/v1/chat/completions", raw=b'{"messages": [],}', headers=HOT)
    assert (code, reply["error"]["type"]) == (422, "invalid_request"), reply
    assert reply["error"]["message"] == "the body is not valid JSON: trailing comma at line 1 column 17", reply
