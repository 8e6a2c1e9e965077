"""A chat call whose request is stored, then meets the store (Redis) failing before its status went out.

OpenAI's SDKs retry a 5xx by default, each retry a new request: the plain 503 of a store that is down
(`Retry-After: 1`) would store and generate the call a second time while the first runs on. Once the
request is stored, the answer is its own 503, with its ids and `x-should-retry: false`
(api/openai_routes.py `store_lost`). The store fails here through the API's own store object (its
first log read of the session after the submit), on a real Valkey.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from sluicegate.sessions import callbacks
from tests.helpers import Stack, fast_settings

MESSAGES = [{"role": "user", "content": "hi"}]
DOWN = redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


@pytest.fixture
def gate(redis_url: str) -> Iterator[Stack]:
    """The stack, with callbacks to 127.0.0.1 allowed (the X-Callback-Url case)."""
    running = Stack(fast_settings(redis_url, sim_prefill_ms=500.0, webhook_allow="127.0.0.1",
                                  webhook_secret="s" * 32)).start(workers=1)
    yield running
    running.stop()


def api_store(stack: Stack) -> Any:
    assert stack._server is not None
    return stack._server.config.app.state.services.store


def fail_first_read(monkeypatch: pytest.MonkeyPatch, stack: Stack, session_id: str) -> None:
    """The API's first log read of `session_id` (the chat call's event stream, after its submit) fails."""
    store = api_store(stack)
    original = store.read_page
    failed: list[str] = []

    async def flaky(sid: str, after: int, limit: int = 1000) -> Any:
        if sid == session_id and not failed:
            failed.append(sid)
            raise DOWN
        return await original(sid, after, limit)

    monkeypatch.setattr(store, "read_page", flaky)


def fail_first_attach(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first noting of a callback fails as a store gone away would; returns the ids it failed for."""
    original = callbacks.attach
    failed: list[str] = []

    async def flaky(redis_client: Any, rid: str, url: str) -> bool:
        if not failed:
            failed.append(rid)
            raise DOWN
        return await original(redis_client, rid, url)

    monkeypatch.setattr(callbacks, "attach", flaky)
    return failed


def requests_stored(stack: Stack, session_id: str) -> int:
    store = api_store(stack)  # its class's read_page: never the flaky one patched on the instance
    _, events = stack._call(type(store).read_page(store, session_id, 0, 1000))
    return sum(event.name == "queued" for event in events)


def sdk_call(stack: Stack, session_id: str, *, stream: bool = False, **headers: str) -> httpx.Response | None:
    """One SDK call with its default retries (2): the error answer it raised, or None when it got an answer."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", timeout=30)
    try:
        answer = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4,  # type: ignore
                                                stream=stream, extra_headers={"X-Session-Id": session_id, **headers})
        if stream:
            list(answer)  # type: ignore[arg-type]
    except openai.APIStatusError as error:
        return error.response
    return None


@pytest.mark.parametrize("stream", [False, True])
def test_a_store_failure_after_the_submit_is_not_retried_by_the_sdk(monkeypatch: pytest.MonkeyPatch, gate: Stack,
                                                                    stream: bool) -> None:
    """Not streamed (whole_answer) and streamed before its first token (first_news): one request stored,
    its 503 says where to read it, and the SDK does not call again."""
    session_id = f"lost-{stream}"
    fail_first_read(monkeypatch, gate, session_id)
    response = sdk_call(gate, session_id, stream=stream)
    assert requests_stored(gate, session_id) == 1  # not submitted again by the SDK
    assert response is not None
    request_id = response.headers.get("X-Request-Id")
    assert response.status_code == 503 and response.headers.get("x-should-retry") == "false"
    assert request_id and response.headers["X-Session-Id"] == session_id
    assert response.json()["error"]["type"] == "unavailable"
    assert f"/v1/requests/{request_id}/events" in response.json()["error"]["message"]


def test_a_store_failure_noting_the_callback_is_the_stored_requests_503(monkeypatch: pytest.MonkeyPatch,
                                                                        gate: Stack) -> None:
    """The callback is noted on the request right after its submit: the store failing there is the stored
    request's 503 too, not a second request."""
    session_id = "lost-callback"
    failed = fail_first_attach(monkeypatch)
    response = sdk_call(gate, session_id, **{"X-Callback-Url": "http://127.0.0.1:9/hook"})
    assert requests_stored(gate, session_id) == 1
    assert response is not None
    assert response.status_code == 503 and response.headers.get("x-should-retry") == "false"
    assert response.headers.get("X-Request-Id") == failed[0]
