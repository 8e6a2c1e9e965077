"""A store that stalls (SIGSTOP here; a blackhole, a long pause) after a submit's call was written: the response
deadline (api/deadline.py) fires long before the store's own timeouts, and the call runs once the store
resumes. Its answer must be the 503 `maybe_stored` naming the request (X-Request-Id, x-should-retry: false,
no Retry-After), as for a submit whose answer was lost, not the plain 503 that says retry: the retry would
store and generate the request a second time. On the resumable submit (the hot path and FastAPI's route)
and a non-streamed chat call. Real Valkey (one server, or every node of the cluster), stopped and resumed."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from sluicegate.embedded import EmbeddedCluster, EmbeddedServer
from tests.helpers import Stack, call, fast_settings, response_deadline

DEADLINE = 1.0  # the response deadline here (the default 5 s would make the test slow)
HOT = {"content-type": "application/json"}  # api/hot_path.py
ROUTED = {"content-type": "application/vnd.api+json"}  # FastAPI's route


@pytest.fixture
def stack(redis_url: str) -> Iterator[Stack]:
    """The API alone (nothing runs what is submitted), its response deadline DEADLINE."""
    with response_deadline(DEADLINE):
        running = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)
    try:
        yield running
    finally:
        running.stop()


def store_pids(server: EmbeddedServer | EmbeddedCluster) -> list[int]:
    """Every process of the store: a submit's calls may go to any node of a cluster."""
    processes = server.processes if isinstance(server, EmbeddedCluster) else [server.process]
    return [p.pid for p in processes if p is not None]


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), {k.lower(): v for k, v in error.headers.items()}


def post_while_stalled(pids: list[int], url: str, body: dict[str, Any],
                       headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The POST's answer with the store stopped (shorter than a cluster's node timeout, 2 s: no failover)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        return post(url, body, headers)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def assert_maybe_stored(code: int, body: dict[str, Any], headers: dict[str, str]) -> str:
    """The 503 of a submit that may have been stored (api/requests_routes.py maybe_stored); its request id."""
    assert code == 503, (code, body)
    assert body["error"]["type"] == "unavailable" and body["error"].get("code") == "maybe_stored", body
    assert "retry-after" not in headers and headers.get("x-should-retry") == "false", headers
    rid = headers["x-request-id"]
    assert f"/v1/requests/{rid}" in body["error"]["message"], body
    return rid


def stored(base: str, rid: str) -> dict[str, Any]:
    """The request once the store has run the submit it resumed with (it exists: not to be sent again)."""
    deadline = time.monotonic() + 20
    while True:
        code, view = call("GET", f"{base}/v1/requests/{rid}")
        if code == 200 or time.monotonic() > deadline:
            assert code == 200, (rid, code, view)
            return view
        time.sleep(0.1)


@pytest.mark.parametrize("path", [HOT, ROUTED], ids=["hot", "routed"])
def test_a_submit_cut_by_the_deadline_in_a_stalled_store_is_maybe_stored(
        stack: Stack, valkey_server: EmbeddedServer | EmbeddedCluster, path: dict[str, str]) -> None:
    base = stack.base_url
    assert call("POST", f"{base}/v1/sessions/warm/requests", {"prompt": "x", "max_tokens": 2})[0] == 202  # caches
    session = "stalled-" + path["content-type"].rsplit("/", 1)[1].replace("+", "-")
    code, body, headers = post_while_stalled(store_pids(valkey_server), f"{base}/v1/sessions/{session}/requests",
                                             {"prompt": "during the stall", "max_tokens": 2}, path)
    rid = assert_maybe_stored(code, body, headers)
    view = stored(base, rid)
    assert view["session_id"] == session and view["status"] == "queued", view


def test_a_chat_call_cut_by_the_deadline_in_a_stalled_store_is_maybe_stored(
        stack: Stack, valkey_server: EmbeddedServer | EmbeddedCluster) -> None:
    base = stack.base_url
    assert call("POST", f"{base}/v1/sessions/warm/requests", {"prompt": "x", "max_tokens": 2})[0] == 202  # caches
    body = {"messages": [{"role": "user", "content": "during the stall"}], "max_tokens": 2}
    code, answer, headers = post_while_stalled(store_pids(valkey_server), f"{base}/v1/chat/completions", body,
                                               {**HOT, "x-session-id": "stalled-chat"})
    rid = assert_maybe_stored(code, answer, headers)
    view = stored(base, rid)
    assert view["session_id"] == "stalled-chat" and view["status"] == "queued", view


@pytest.mark.single_server  # the API's connections are killed on the one server it uses
def test_a_submit_whose_connection_was_not_back_when_the_deadline_came_says_retry(
        stack: Stack, valkey_server: EmbeddedServer, redis_url: str) -> None:
    """The API's connection to the store lost just before a stall: its submit waits to reconnect when the
    deadline cuts it, nothing was sent, so the answer is the plain 503 that says retry (not `maybe_stored`,
    which tells the client not to, for a request that does not exist)."""
    base = stack.base_url
    assert call("POST", f"{base}/v1/sessions/warm/requests", {"prompt": "x", "max_tokens": 2})[0] == 202  # caches
    admin = redis.Redis.from_url(redis_url)
    try:
        me = admin.client_id()
        for client in admin.client_list():  # the API's named connections (the pipelined one among them)
            if int(client["id"]) != me and client.get("name"):
                admin.client_kill_filter(_id=client["id"])
    finally:
        admin.close()
    time.sleep(0.3)  # the API has seen its connection go
    code, body, headers = post_while_stalled(store_pids(valkey_server), f"{base}/v1/sessions/reconnecting/requests",
                                             {"prompt": "during the stall", "max_tokens": 2}, HOT)
    assert code == 503 and body["error"].get("code") != "maybe_stored", (code, body, headers)
    assert headers.get("retry-after") == "1" and "x-should-retry" not in headers, headers
