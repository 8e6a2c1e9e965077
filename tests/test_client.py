"""The Python client (sluicegate/client/) against a real stack: submit and stream, resuming by itself
across API restarts (graceful and kill -9) with no token lost or doubled, chat streamed and not, and
the API's errors as SluicegateError with their code. Real Valkey, real HTTP; nothing mocked."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sluicegate.client import (
    AsyncClient,
    Client,
    CursorExpired,
    Event,
    InvalidArgument,
    SluicegateError,
    StreamUnavailable,
)
from sluicegate.embedded import free_port
from tests.client_helpers import restartable_stack
from tests.helpers import Stack, call, fast_settings

USER = [{"role": "user", "content": "tell me about sluice gates"}]


def check_request(events: list[Event], request_id: str, n: int) -> None:
    """Ids strictly increase; the tokens are 0..n-1, each once; then `done` with n tokens."""
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)), ids
    assert all(e.request_id == request_id for e in events)
    assert [e.index for e in events if e.event == "token"] == list(range(n))
    assert events[-1].event == "done" and events[-1].data["tokens"] == n, events[-1]


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.base_url) as c:
        yield c


def test_submit_and_stream_to_done(stack: Stack, client: Client) -> None:
    sent = client.submit("client-1", "hello there", max_tokens=20, priority="high", tenant="acme",
                         params={"temperature": 0.2})
    assert sent.session_id == "client-1" and sent.status == "queued"
    assert sent.events_url.endswith(f"/v1/requests/{sent.request_id}/events")
    events = list(client.stream(request_id=sent.request_id))
    check_request(events, sent.request_id, 20)
    assert events[0].event == "queued"
    info = client.request(sent.request_id)
    assert (info["status"], info["tokens"], info["priority"], info["tenant"]) == ("done", 20, 7, "acme")
    # The session form from a cursor: exactly the events after it (the session form never ends by itself).
    after = events[4].id
    session = client.stream(session_id="client-1", after=after)
    replayed = [next(session) for _ in range(len(events) - 5)]
    session.close()
    assert replayed == events[5:]


def test_a_request_stream_resumed_at_its_end_ends_at_once(stack: Stack, client: Client) -> None:
    """The API answers 204 to a request stream resumed at or past its terminal event (an EventSource stops
    there); the client ends the stream, where it would reconnect for as long as it may."""
    sent = client.submit("client-ended", "hello", max_tokens=3)
    last = list(client.stream(request_id=sent.request_id))[-1]
    assert last.event == "done"
    started = time.monotonic()
    assert list(client.stream(request_id=sent.request_id, after=last.id, reconnect_timeout=20)) == []

    async def resumed() -> list[Event]:
        async with AsyncClient(stack.base_url, reconnect_timeout=20) as async_client:
            return [e async for e in async_client.stream(request_id=sent.request_id, after=last.id)]

    assert asyncio.run(resumed()) == []
    assert time.monotonic() - started < 10  # not the reconnect timeout's 20 s, twice


def test_messages_and_cancel(client: Client) -> None:
    sent = client.submit("client-2", [{"role": "user", "content": "hi"}], max_tokens=30_000)
    stream = client.stream(request_id=sent.request_id)
    first_token = next(e for e in stream if e.event == "token")
    assert first_token.index == 0
    client.cancel(sent.request_id)
    rest = list(stream)
    assert rest[-1].event == "cancelled"
    assert client.request(sent.request_id)["status"] == "cancelled"


def test_stream_resumes_across_api_restarts(redis_url: str) -> None:
    """A graceful restart (the stream ends cleanly) and a kill -9 (the connection dies) of the API in the
    middle of one request: the client reconnects with Last-Event-ID, every index once."""
    settings = fast_settings(redis_url, sim_tokens_per_second=60.0)
    with restartable_stack(settings) as api, Client(api.base_url, reconnect_timeout=30) as client:
        reconnects: list[str] = []
        sent = client.submit("resume-1", "long answer", max_tokens=150)
        events: list[Event] = []
        restarts = {20: signal.SIGTERM, 70: signal.SIGKILL}
        threads = []
        for event in client.stream(request_id=sent.request_id,
                                   on_reconnect=lambda error, wait: reconnects.append(type(error).__name__)):
            events.append(event)
            if event.event == "token" and event.index in restarts:
                threads.append(api.restart_in_background(restarts.pop(event.index), down_for=0.5))
        for thread in threads:
            thread.join(30)
        check_request(events, sent.request_id, 150)
        assert not restarts and len(reconnects) >= 2, reconnects
        assert client.request(sent.request_id)["status"] == "done"


def test_async_client_streams_and_resumes(redis_url: str) -> None:
    settings = fast_settings(redis_url, sim_tokens_per_second=60.0)
    with restartable_stack(settings) as api:

        async def main() -> tuple[Any, list[Event], int, dict[str, Any]]:
            async with AsyncClient(api.base_url, reconnect_timeout=30) as client:
                short = await client.submit("async-0", "short", max_tokens=5)
                assert [e.index async for e in client.stream(request_id=short.request_id) if e.event == "token"] \
                    == list(range(5))
                sent = await client.submit("async-1", "long answer", max_tokens=100)
                events: list[Event] = []
                reconnects = 0

                def counted(*_: Any) -> None:
                    nonlocal reconnects
                    reconnects += 1

                thread = None
                async for event in client.stream(session_id="async-1", on_reconnect=counted):
                    events.append(event)
                    if event.index == 30 and thread is None:
                        thread = api.restart_in_background(signal.SIGKILL, down_for=0.5)
                    if event.event == "done":
                        break
                assert thread is not None
                await asyncio.to_thread(thread.join, 30)
                return sent, events, reconnects, await client.request(sent.request_id)

        sent, events, reconnects, info = asyncio.run(main())
        check_request(events, sent.request_id, 100)
        assert reconnects >= 1 and info["status"] == "done"


def test_chat_non_stream_and_stream(stack: Stack, client: Client) -> None:
    answer = client.chat(USER, max_tokens=6, session_id="chat-client", priority="critical", tenant="acme")
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["completion_tokens"] == 6 and answer["choices"][0]["finish_reason"] == "length"
    request_id = answer["id"].removeprefix("chatcmpl-")
    assert client.request(request_id)["priority"] == 9
    chunks = list(client.chat(USER, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == answer["choices"][0]["message"]["content"]  # the sim engine: deterministic per prompt
    assert chunks[-1]["usage"]["completion_tokens"] == 6

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with AsyncClient(stack.base_url) as aclient:
            whole = await aclient.chat(USER, max_tokens=4)
            parts = [c async for c in await aclient.chat(USER, max_tokens=4, stream=True)]
            return whole, parts

    whole, parts = asyncio.run(main())
    assert whole["usage"]["completion_tokens"] == 4
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in parts if c["choices"]) \
        == whole["choices"][0]["message"]["content"]


def test_errors_carry_status_and_code(stack: Stack, client: Client) -> None:
    cases = [
        (lambda: client.submit("errors", "x", group="no-such-group"), 404, "unknown_group"),
        (lambda: client.submit("errors", "x", max_tokens=0), 422, "invalid_request"),
        (lambda: client.request("nope"), 404, "not_found"),
        (lambda: client.chat(USER, model="no-such-model"), 404, "model_not_found"),
        (lambda: client.chat(USER, model="no-such-model", stream=True), 404, "model_not_found"),
    ]
    for call_it, status, code in cases:
        with pytest.raises(SluicegateError) as caught:
            call_it()
        assert (caught.value.status, caught.value.code) == (status, code), caught.value
        assert caught.value.message
    # A 4xx on a stream is raised at once, never retried.
    started = time.monotonic()
    with pytest.raises(SluicegateError) as caught:
        next(client.stream(request_id="nope"))
    assert caught.value.status == 404 and time.monotonic() - started < 2
    sent = client.submit("errors", "x", max_tokens=2)
    list(client.stream(request_id=sent.request_id))
    with pytest.raises(CursorExpired) as expired:
        next(client.stream(session_id="errors", after=10_000))
    assert expired.value.status == 409 and expired.value.code == "cursor_expired"

    async def async_error() -> SluicegateError:
        async with AsyncClient(stack.base_url) as aclient:
            try:
                await aclient.submit("errors", "x", group="no-such-group")
            except SluicegateError as error:
                return error
        raise AssertionError("no error")

    assert asyncio.run(async_error()).code == "unknown_group"


def test_unreachable_server_gives_up_in_time() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, reconnect_timeout=1.0) as client:
        with pytest.raises(SluicegateError) as caught:
            client.stats()
        assert caught.value.status is None and caught.value.code == "unreachable"
        started = time.monotonic()
        with pytest.raises(StreamUnavailable):
            next(client.stream(session_id="anything"))
        assert 0.9 < time.monotonic() - started < 5


def test_api_key_and_environment(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=1)
    try:
        monkeypatch.setenv("SLUICEGATE_URL", running.base_url)
        with Client() as anonymous:
            with pytest.raises(SluicegateError) as caught:
                anonymous.stats()
            assert caught.value.status == 401
        monkeypatch.setenv("SLUICEGATE_API_KEY", "admin-secret")
        with Client() as admin:
            assert admin.set_weight("acme", 2.5)["weight"] == 2.5
            key = call("POST", f"{running.base_url}/v1/admin/keys", {"tenant": "acme"},
                       headers={"Authorization": "Bearer admin-secret"})[1]["key"]
        with Client(api_key=key) as tenant:
            sent = tenant.submit("keyed", "hi", max_tokens=3)
            assert [e.event for e in tenant.stream(request_id=sent.request_id)][-1] == "done"
            assert tenant.request(sent.request_id)["tenant"] == "acme"
            with pytest.raises(SluicegateError) as caught:
                tenant.stats()
            assert caught.value.status == 403
    finally:
        running.stop()


def test_admin_helpers(client: Client) -> None:
    assert client.set_quota("default", requests_per_second=10, burst=5, max_concurrency=3)["quota"] == \
        {"requests_per_second": 10, "burst": 5, "max_concurrency": 3}
    assert client.set_quota("default", burst=None)["quota"] == {"requests_per_second": 10, "max_concurrency": 3}
    client.set_weight("globex", 4)
    assert {t["tenant"]: t["weight"] for t in client.tenants()}["globex"] == 4.0
    stats = client.stats()
    group = next(g for g in stats["groups"] if g["group"] == "default")
    assert group["quota"] == {"requests_per_second": 10, "max_concurrency": 3}
    assert len(stats["workers"]) == 1


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000", "ftp://127.0.0.1:8000", "http://"])
def test_a_base_url_that_is_not_http_is_refused_when_the_client_is_built(url: str) -> None:
    """Not a `no_answer` at each call (nor a stream retried for its whole reconnect_timeout): nothing could
    ever be sent to it."""
    with pytest.raises(InvalidArgument) as caught:
        Client(url)
    assert caught.value.code == "invalid_request" and "http://" in caught.value.message
    with pytest.raises(InvalidArgument):
        AsyncClient(url)
