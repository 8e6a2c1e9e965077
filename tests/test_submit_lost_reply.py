"""A submit whose answer is lost on the way (the connection broke after the server ran it): it is stored
and runs, so it must not be answered as a failed submit that a client retries (a second request,
generated and charged twice). The call is sent once more with the same request id, which the script
answers as the first time did; when that one gets no answer either, the 503 names the request and says
not to retry. Real Valkey, behind a proxy that drops answers."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from sluicegate.embedded import EmbeddedServer
from sluicegate.sessions import keys
from sluicegate.sessions.registry import register_group
from sluicegate.sessions.requests import NewRequest, new_request_id
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import MaybeStored, Transitions
from tests.cutting_proxy import CuttingProxy
from tests.helpers import Stack, call, fast_settings

pytestmark = pytest.mark.single_server  # a proxy in front of one server


@pytest.fixture
def proxied(valkey_server: EmbeddedServer, redis_url: str) -> Iterator[tuple[CuttingProxy, str]]:
    """A proxy in front of the test server, and the server's URL through it."""
    proxy = CuttingProxy(valkey_server.port)
    parts = urlsplit(redis_url)
    yield proxy, urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{proxy.port}")))
    proxy.close()


def post_with_headers(url: str, body: dict) -> tuple[int, dict, dict[str, str]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), {k.lower(): v for k, v in error.headers.items()}


def submit_through(url: str, proxy: CuttingProxy, drop: int) -> tuple[str, str | int]:
    """One submit through the proxy, the first `drop` connections' answers lost: (request id, the
    outcome, or "maybe_stored")."""
    async def go() -> tuple[str, str | int]:
        client = redis.asyncio.Redis.from_url(url, retry=None)  # the resend under test is the only one
        try:
            await register_group(client, "default")
            transitions = Transitions(Scripts(client, single_server=True), lease_ms=5000, session_ttl=60)
            await transitions.scripts.load()
            await client.ping()  # connected: the next answer is the submit's
            req = NewRequest(session_id="lost", max_tokens=4, priority=5, tenant="t", group="default", prompt="hi",
                             request_id=new_request_id("lost"))
            proxy.drop_next = drop
            try:
                outcome, seq = await transitions.submit(req)
            except MaybeStored:
                return req.request_id, "maybe_stored"
            return req.request_id, f"{outcome} {seq}"
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_a_submit_whose_answer_was_lost_is_asked_again_and_stored_once(proxied: tuple[CuttingProxy, str],
                                                                      r: redis.Redis) -> None:
    proxy, url = proxied
    rid, outcome = submit_through(url, proxy, drop=1)
    assert outcome == "ok 1"  # the resend's answer: the first call's own (a replay)
    assert r.lrange(keys.session_queue("lost"), 0, -1) == [rid]  # one request, not two


def test_a_submit_with_no_answer_twice_may_have_been_stored(proxied: tuple[CuttingProxy, str],
                                                          r: redis.Redis) -> None:
    proxy, url = proxied
    rid, outcome = submit_through(url, proxy, drop=2)
    assert outcome == "maybe_stored"
    assert r.lrange(keys.session_queue("lost"), 0, -1) == [rid]  # and it was


def test_the_api_answers_a_submit_it_may_have_stored_with_its_id_and_no_retry(
        proxied: tuple[CuttingProxy, str], r: redis.Redis) -> None:
    proxy, url = proxied
    stack = Stack(fast_settings(url)).start(scheduler=False, workers=0)
    try:
        assert call("POST", f"{stack.base_url}/v1/sessions/api-lost/requests", {"prompt": "x", "max_tokens": 2})[0] \
            == 202  # warm: the group and the connections exist
        proxy.drop_answers = True
        code, body, headers = post_with_headers(f"{stack.base_url}/v1/sessions/api-lost/requests",
                                                {"prompt": "hi", "max_tokens": 2})
        proxy.drop_answers = False
        assert code == 503 and body["error"]["code"] == "maybe_stored", body
        assert headers.get("x-should-retry") == "false" and "retry-after" not in headers
        rid = headers["x-request-id"]
        assert rid in body["error"]["message"]
        assert r.lrange(keys.session_queue("api-lost"), 0, -1)[-1] == rid  # it was stored: not to be sent again
    finally:
        proxy.drop_answers = False
        stack.stop()


def test_a_submit_that_never_reached_the_store_is_the_plain_retryable_503(
        proxied: tuple[CuttingProxy, str], r: redis.Redis) -> None:
    """Nothing could connect (the store down): nothing was sent, so nothing may have been stored, and the
    answer is the plain 503 that says retry (not maybe_stored, which would stop an SDK's retries)."""
    proxy, url = proxied
    stack = Stack(fast_settings(url)).start(scheduler=False, workers=0)
    try:
        assert call("POST", f"{stack.base_url}/v1/sessions/down/requests", {"prompt": "x", "max_tokens": 2})[0] == 202
        proxy.refuse = True  # no new connection gets through
        proxy.cut()  # and the API's are closed, before it is sent anything more
        code, body, headers = post_with_headers(f"{stack.base_url}/v1/sessions/down/requests",
                                                {"prompt": "hi", "max_tokens": 2})
        assert code == 503 and body["error"].get("code") != "maybe_stored", body
        assert headers.get("retry-after") == "1" and "x-request-id" not in headers
        assert len(r.lrange(keys.session_queue("down"), 0, -1)) == 1  # only the warm one
    finally:
        stack.stop()


def test_a_submit_whose_answer_was_lost_and_then_cannot_reconnect_may_have_been_stored(
        proxied: tuple[CuttingProxy, str], r: redis.Redis) -> None:
    """The call went out and its answer was lost; every attempt after it could not even connect: the first
    may have run, so it is the 503 that names the request (the lean client's own retry must not hide that
    the first went out)."""
    proxy, url = proxied
    stack = Stack(fast_settings(url)).start(scheduler=False, workers=0)
    try:
        assert call("POST", f"{stack.base_url}/v1/sessions/half/requests", {"prompt": "x", "max_tokens": 2})[0] == 202
        proxy.drop_next = 1_000  # every answer lost from now on...
        proxy.refuse = True  # ...and no new connection gets through
        code, body, headers = post_with_headers(f"{stack.base_url}/v1/sessions/half/requests",
                                                {"prompt": "hi", "max_tokens": 2})
        assert code == 503 and body["error"]["code"] == "maybe_stored", body
        assert r.lrange(keys.session_queue("half"), 0, -1)[-1] == headers["x-request-id"]  # it was stored
    finally:
        stack.stop()
