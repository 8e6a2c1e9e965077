"""Revoking a tenant key, or its expiry, ends the SSE streams it opened (itself or through a stream token
minted from it) within api/key_watch.py's bound: a leaked key's stream stops delivering the tenant's
later output, and its reconnect gets 401. Checking costs no Redis read per stream: streams of one key
share one read per KEY_CHECK_SECONDS."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from sluicegate.api.auth import KEY_CHECK_SECONDS, KeyRing, KeyState
from sluicegate.api.key_watch import BOUND_SECONDS
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings

ADMIN = {"Authorization": "Bearer admin-secret"}
PING = 0.3
SLACK = 3.0  # a loaded machine's delays on top of the bound


@pytest.fixture
def auth_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret", sse_ping_seconds=PING,
                                  sim_tokens_per_second=50.0)).start(workers=1)
    yield running
    running.stop()


@dataclass
class OpenStream:
    """An SSE stream read in a thread: its events and when it ended."""

    response: http.client.HTTPResponse
    events: list[dict[str, Any]] = field(default_factory=list)
    ended_at: float | None = None

    def read(self) -> None:
        try:
            while line := self.response.readline():
                if line.startswith(b"data: "):
                    self.events.append(json.loads(line[6:]))
        except Exception:
            pass
        self.ended_at = time.monotonic()

    def wait_end(self, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while self.ended_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.ended_at


def open_stream(base: str, path: str, headers: dict[str, str] | None = None) -> OpenStream:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    assert response.status == 200, (path, response.status, response.read())
    stream = OpenStream(response)
    threading.Thread(target=stream.read, daemon=True).start()
    return stream


def new_key(base: str, **body: Any) -> tuple[str, dict[str, str]]:
    created = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme", **body}, headers=ADMIN)[1]
    return created["key_id"], {"Authorization": f"Bearer {created['key']}"}


def submit(base: str, sid: str, headers: dict[str, str], max_tokens: int = 2) -> str:
    code, reply = call("POST", f"{base}/v1/sessions/{sid}/requests", {"prompt": "x", "max_tokens": max_tokens},
                       headers=headers)
    assert code == 202, reply
    return str(reply["request_id"])


def test_revoking_a_key_ends_its_session_stream_before_the_tenants_next_output(auth_stack: Stack) -> None:
    base = auth_stack.base_url
    leaked_id, leaked = new_key(base)
    _, fresh = new_key(base)
    submit(base, "s1", leaked)
    stream = open_stream(base, "/v1/sessions/s1/events", leaked)
    time.sleep(0.5)
    assert call("DELETE", f"{base}/v1/admin/keys/{leaked_id}", headers=ADMIN)[0] == 200
    later = submit(base, "s1", fresh, max_tokens=5)
    assert stream.wait_end(PING + SLACK) is not None, "the revoked key's stream is still open"
    time.sleep(0.5)
    assert [e for e in stream.events if e.get("request_id") == later] == []
    assert call("GET", f"{base}/v1/sessions/s1/events", headers=leaked)[0] == 401


def test_a_key_revoked_by_another_api_process_ends_its_streams_within_the_bound(auth_stack: Stack,
                                                                                 r: redis.Redis) -> None:
    base = auth_stack.base_url
    key_id, headers = new_key(base)
    rid = submit(base, "s2", headers, max_tokens=2000)  # 40 s of output at 50 tokens/s
    by_key = open_stream(base, f"/v1/requests/{rid}/events", headers)
    token = call("POST", f"{base}/v1/stream-tokens", {"session_id": "s2"}, headers=headers)[1]["token"]
    by_token = open_stream(base, f"/v1/sessions/s2/events?token={token}")
    time.sleep(0.3)
    # what another API process's revoke writes (api/auth.py KeyRing.revoke): this one's cache knows nothing
    revoked_at = time.monotonic()
    r.hdel(keys.API_KEYS, r.hget(keys.API_KEY_IDS, key_id))
    r.hdel(keys.API_KEY_IDS, key_id)
    for stream in (by_key, by_token):
        ended = stream.wait_end(BOUND_SECONDS + PING + SLACK)
        assert ended is not None and ended - revoked_at <= BOUND_SECONDS + PING + SLACK
    assert by_key.events and by_key.events[-1]["request_id"] == rid  # it did stream until then
    assert call("GET", f"{base}/v1/requests/{rid}/events", headers=headers)[0] == 401
    assert call("GET", f"{base}/v1/sessions/s2/events?token={token}")[0] == 401


def test_an_expired_keys_stream_ends_soon_after_the_expiry(auth_stack: Stack) -> None:
    base = auth_stack.base_url
    _, headers = new_key(base, expires_in=1.5)
    rid = submit(base, "s3", headers, max_tokens=2000)
    expires = time.monotonic() + 1.5
    stream = open_stream(base, f"/v1/requests/{rid}/events", headers)
    ended = stream.wait_end(1.5 + BOUND_SECONDS + SLACK)
    assert ended is not None and ended >= expires - 0.2


class CountingRedis:
    """A real client that counts the commands the key ring sends (to prove they do not scale with streams)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent = 0

    def __getattr__(self, name: str) -> Any:
        command = getattr(self.client, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.sent += 1
            await asyncio.sleep(0.01)  # a read in flight while the other streams ask
            return await command(*args, **kwargs)

        return counted


def test_many_streams_of_one_key_share_one_read_of_its_state(redis_url: str) -> None:
    async def scenario() -> None:
        client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            ring = KeyRing(client, enabled=True, admin_key=None)
            created = await ring.create("acme")
            spy = CountingRedis(client)
            ring.redis = spy  # type: ignore[assignment]
            assert all(await asyncio.gather(*(ring.key_live(created["key_id"]) for _ in range(1000))))
            assert spy.sent == 2  # the key's digest, then its record
            assert all(await asyncio.gather(*(ring.key_live(created["key_id"]) for _ in range(1000))))
            assert spy.sent == 2  # a local lookup until KEY_CHECK_SECONDS have passed
            ring.states[created["key_id"]] = KeyState(time.monotonic() - KEY_CHECK_SECONDS, exists=True)
            assert await ring.key_live(created["key_id"]) and spy.sent == 4
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_revoking_a_key_ends_its_streamed_chat_answer_with_an_error(auth_stack: Stack) -> None:
    """A chat stream is an SSE stream opened with the key too: it ends with an `unauthorized` error object
    and `[DONE]` (the SDK raises), and delivers nothing written past the bound."""
    base = auth_stack.base_url
    key_id, headers = new_key(base)
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", headers={**headers, "content-type": "application/json"},
                 body=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
                                  "stream": True}))  # 40 s of output at 50 tokens/s
    response = conn.getresponse()
    assert response.status == 200
    lines: list[tuple[float, bytes]] = []
    ended = threading.Event()

    def read() -> None:
        while line := response.readline():
            if line.startswith(b"data: "):
                lines.append((time.monotonic(), line[6:].strip()))
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    time.sleep(1.0)
    assert call("DELETE", f"{base}/v1/admin/keys/{key_id}", headers=ADMIN)[0] == 200
    revoked_at = time.monotonic()
    assert ended.wait(BOUND_SECONDS + SLACK), "the revoked key's chat stream is still open"
    assert lines[-1][1] == b"[DONE]" and json.loads(lines[-2][1])["error"]["type"] == "unauthorized"
    assert all(at <= revoked_at + BOUND_SECONDS + SLACK for at, _ in lines)
    assert len(lines) > 20  # it did stream until then


def test_revoking_a_key_ends_its_non_streamed_chat_answer_with_a_401(auth_stack: Stack) -> None:
    """A non-streamed chat answer waits for its request's end: a key revoked meanwhile gets a 401 with the
    `unauthorized` error object within the bound, not the whole completion minutes later."""
    base = auth_stack.base_url
    key_id, headers = new_key(base)
    answers: list[tuple[int, Any, float]] = []

    def ask() -> None:
        code, body = call("POST", f"{base}/v1/chat/completions", headers=headers,
                          body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000})  # 40 s
        answers.append((code, body, time.monotonic()))

    caller = threading.Thread(target=ask, daemon=True)
    caller.start()
    time.sleep(1.0)
    assert call("DELETE", f"{base}/v1/admin/keys/{key_id}", headers=ADMIN)[0] == 200
    revoked_at = time.monotonic()
    caller.join(BOUND_SECONDS + SLACK)
    assert answers, "the revoked key's answer is still held"
    code, body, at = answers[0]
    assert code == 401 and body["error"]["type"] == "unauthorized" and at <= revoked_at + BOUND_SECONDS + SLACK


class SlowReplies:
    """A real client whose HGET replies come 50 ms late (a loaded process, a slow link)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        command = getattr(self.client, name)
        if name != "hget":
            return command

        async def slow(*args: Any, **kwargs: Any) -> Any:
            value = await command(*args, **kwargs)
            await asyncio.sleep(0.05)
            return value

        return slow


def test_a_read_in_flight_does_not_bring_back_a_key_revoked_here(redis_url: str) -> None:
    """A stream's check that read the key just before this process revoked it must not leave the key live
    in the cache: streams of a key revoked here end at their next check."""
    async def scenario() -> None:
        client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            ring = KeyRing(client, enabled=True, admin_key=None)
            key_id = (await ring.create("acme"))["key_id"]
            ring.redis = SlowReplies(client)  # type: ignore[assignment]
            in_flight = asyncio.ensure_future(ring.key_live(key_id))
            await asyncio.sleep(0.07)  # it has the digest, and its read of the record is on its way
            ring.redis = client
            assert await ring.revoke(key_id)
            await in_flight
            assert not await ring.key_live(key_id)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_key_revoked_while_its_streamed_chat_waits_for_its_first_token_gets_none_of_it(redis_url: str) -> None:
    """The chat route holds what comes before the first token (the answer's head goes out with it): a key revoked
    during that wait ends the stream before any of it, as a revocation through this process ends a stream at once
    (old: the held tokens went out, then ~2 s more, before the error)."""
    stack = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret", sse_ping_seconds=10.0,  # no ping in
                                sim_tokens_per_second=200.0)).start(workers=0)  # the wait: it ends with the first token
    try:
        base = stack.base_url
        key_id, headers = new_key(base)
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        answer: dict[str, Any] = {}

        def chat() -> None:  # its answer's head comes only with the first token
            conn.request("POST", "/v1/chat/completions", headers={**headers, "content-type": "application/json"},
                         body=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
                                          "stream": True}))
            response = conn.getresponse()
            answer["status"] = response.status
            answer["data"] = [line[6:].strip() for line in iter(response.readline, b"") if line.startswith(b"data: ")]

        reader = threading.Thread(target=chat, daemon=True)
        reader.start()
        time.sleep(1.0)  # waiting: no worker
        assert call("DELETE", f"{base}/v1/admin/keys/{key_id}", headers=ADMIN)[0] == 200
        time.sleep(3.0)  # still waiting, past a stream's key check interval
        stack.add_worker()
        reader.join(30)
        assert not reader.is_alive(), "the revoked key's chat stream is still open"
        data = answer["data"]
        assert answer["status"] == 200 and data[-1] == b"[DONE]"
        assert [json.loads(line)["error"]["type"] for line in data[:-1]] == ["unauthorized"], data[:3]  # no token
    finally:
        stack.stop()
