"""A push-mode submit (or chat call) whose request is stored, then meets a store that stalls (answers nothing,
fails nothing) while its callback is noted: the answer is the stored request's 503 (X-Request-Id, no
Retry-After, x-should-retry false), never the response deadline's plain 503 that says retry, since a retry
would store and generate the request a second time. The wait is bounded (api/callbacks.py ATTACH_SECONDS), not
the Redis socket timeouts. Real Valkey, behind a proxy that swallows the callback_attach EVAL."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai
import pytest

from sluicegate.embedded import EmbeddedServer
from tests.cutting_proxy import CuttingProxy
from tests.helpers import Stack, call, fast_settings, wait_for
from tests.test_chat_stored_retry import requests_stored

pytestmark = pytest.mark.single_server  # a proxy in front of one server

MARK = b"callback_attach.lua"  # the script's header comment, sent with every EVAL of it
HOOK = "http://127.0.0.1:9/hook"
HANG = 12.0  # under the API's Redis socket timeout (15 s): an attach that waited for it fails the test


class AttachStallingProxy(CuttingProxy):
    """Forwards everything, except a callback_attach EVAL while `stall` is set: it never reaches the server, and
    its connection never answers again (a store that stopped answering just then)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.stall = True
        self.swallowed = 0

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        if answers:
            super()._pipe(source, sink, answers)
            return
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.stall and MARK in data:
                    self.swallowed += 1
                    return  # both sides left open and silent: `cut` closes them
                sink.sendall(data)
        for side in (source, sink):
            with contextlib.suppress(OSError):
                side.shutdown(socket.SHUT_RDWR)
            side.close()


@pytest.fixture
def stalled(valkey_server: EmbeddedServer, redis_url: str) -> Iterator[tuple[Stack, AttachStallingProxy]]:
    """The stack, all its Redis calls through the proxy; callbacks to 127.0.0.1 allowed."""
    proxy = AttachStallingProxy(valkey_server.port)
    parts = urlsplit(redis_url)
    via = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{proxy.port}")))
    stack = Stack(fast_settings(via, webhook_allow="127.0.0.1", webhook_secret="s")).start(workers=1)
    yield stack, proxy
    stack.stop()
    proxy.cut()
    proxy.close()


def assert_stored_503(answer: httpx.Response) -> str:
    """The stored request's 503: its id, no retry asked for. Returns the id."""
    assert answer.status_code == 503, (answer.status_code, answer.text)
    assert answer.headers.get("retry-after") is None, dict(answer.headers)  # the plain 503 has Retry-After: 1
    assert answer.headers.get("x-should-retry") == "false", dict(answer.headers)
    request_id = answer.headers.get("x-request-id")
    assert request_id, dict(answer.headers)
    assert "may not have been noted" in answer.json()["error"]["message"], answer.text
    return request_id


def test_a_submit_whose_callback_attach_stalls_gets_the_stored_requests_503(
        stalled: tuple[Stack, AttachStallingProxy]) -> None:
    stack, proxy = stalled
    answer = httpx.post(f"{stack.base_url}/v1/sessions/stall-1/requests", timeout=HANG,
                        json={"prompt": "hi", "max_tokens": 3, "callback_url": HOOK})
    assert proxy.swallowed >= 1, "the attach never went out"
    request_id = assert_stored_503(answer)
    body = answer.json()
    assert body["error"]["code"] == "callback_not_noted" and body["request_id"] == request_id, body
    assert body["events_url"] == f"/v1/requests/{request_id}/events", body
    assert requests_stored(stack, "stall-1") == 1
    # It runs on: the store answers again, and the request it named ends.
    proxy.stall = False
    wait_for(lambda: call("GET", f"{stack.base_url}/v1/requests/{request_id}")[1]["status"] == "done", timeout=15,
             what="the stored request's end")


def test_a_chat_call_whose_callback_attach_stalls_is_not_retried_by_the_sdk(
        stalled: tuple[Stack, AttachStallingProxy]) -> None:
    stack, proxy = stalled
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", timeout=HANG)  # its default 2 retries
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       extra_headers={"X-Callback-Url": HOOK, "X-Session-Id": "stall-2"})
    request_id = assert_stored_503(raised.value.response)
    assert f"/v1/requests/{request_id}/events" in raised.value.response.json()["error"]["message"]
    assert proxy.swallowed == 1  # one call, not retried
    assert requests_stored(stack, "stall-2") == 1
