"""A JSON body sent as anything but JSON is a 415, unread, on the chat route as on the submit, on the hot path
(api/hot_path.py) and through FastAPI alike: a web page's cross-site POST of a form or of text/plain skips
the CORS preflight, and auth is off by default on loopback, so such a body must not start a generation."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.helpers import Stack, call, fast_settings
from tests.test_hot_path import fastapi_path

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
SUBMIT = {"prompt": "hi", "max_tokens": 1}
NOT_JSON = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
            "text/json", "application/jsonx", ""]
JSON_TYPES = ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"]


def post(url: str, body: dict, content_type: str | None) -> tuple[int, dict]:
    """POST `body` as JSON text with that Content-Type header (None: none at all, which helpers.call cannot)."""
    host, rest = url.removeprefix("http://").split("/", 1)
    name, port = host.split(":")
    connection = http.client.HTTPConnection(name, int(port), timeout=30)
    try:
        headers = {} if content_type is None else {"content-type": content_type}
        connection.request("POST", "/" + rest, json.dumps(body), headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/sessions/ct-1/requests", SUBMIT)],
                         ids=["chat", "submit"])
def test_a_body_not_sent_as_json_is_415_on_both_paths(stack: Stack, path: str, body: dict) -> None:
    with fastapi_path(stack) as other:
        for base in (stack.base_url, other):
            for content_type in NOT_JSON:
                code, reply = post(base + path, body, content_type)
                assert code == 415, (base, content_type, code, reply)
                assert reply["error"]["type"] == "unsupported_media_type"
                assert "application/json" in reply["error"]["message"]
            for content_type in JSON_TYPES:
                code, reply = post(base + path, body, content_type)
                assert code in (200, 202), (base, content_type, code, reply)


def test_the_key_check_comes_before_the_content_type(redis_url: str) -> None:
    # with auth on, an unauthenticated caller learns nothing about what the route takes
    keyed = Stack(fast_settings(redis_url, auth=True, admin_key="adm")).start(workers=1)
    try:
        with fastapi_path(keyed) as other:
            for base in (keyed.base_url, other):
                for path, body in (("/v1/chat/completions", CHAT), ("/v1/sessions/ct-2/requests", SUBMIT)):
                    assert post(base + path, body, "text/plain")[0] == 401, (base, path)
                    code, reply = call("POST", base + path, raw=json.dumps(body).encode(),
                                       headers={"content-type": "text/plain", "authorization": "Bearer adm"})
                    assert code == 415, (base, path, code, reply)
    finally:
        keyed.stop()
