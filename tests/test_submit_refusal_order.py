"""A submit (or chat call) to a group that does not exist is `404 unknown_group` whatever its tenant's count:
never a retryable `429 tenant_limit` (Retry-After) for a request that can never be accepted. The group is
checked before `max_queued` takes a place and before `max_streams` counts a stream. (A session of another
tenant, `403`, is decided in the submit's script, after the limits: not covered here.)"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings

ADMIN = {"Authorization": "Bearer admin-secret"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def auth_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret",
                                  sim_tokens_per_second=20.0)).start(workers=1)
    yield running
    running.stop()


def tenant_key(base: str) -> dict[str, str]:
    code, created = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)
    assert code == 201, created
    return {"Authorization": f"Bearer {created['key']}"}


def assert_unknown_group(code: int, body: dict) -> None:
    assert (code, body["error"]["type"]) == (404, "unknown_group"), (code, body)


def test_a_tenant_at_max_queued_gets_404_for_an_unknown_group(auth_stack: Stack, r: redis.Redis) -> None:
    base = auth_stack.base_url
    acme = tenant_key(base)
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_queued": 1}, headers=ADMIN)[0] == 200
    code, held = call("POST", f"{base}/v1/sessions/s1/requests", {"prompt": "x", "max_tokens": 2000}, headers=acme)
    assert code == 202, held  # its one place, held for 100 s
    code, body = call("POST", f"{base}/v1/sessions/s2/requests", {"prompt": "x", "max_tokens": 2, "group": "nope"},
                      headers=acme)
    assert_unknown_group(code, body)
    code, body = call("POST", f"{base}/v1/chat/completions", CHAT, headers={**acme, "X-Group": "nope"})
    assert_unknown_group(code, body)
    # a known group is still refused, and the refusals took no place
    code, body = call("POST", f"{base}/v1/sessions/s3/requests", {"prompt": "x", "max_tokens": 2}, headers=acme)
    assert (code, body["error"]["type"]) == (429, "tenant_limit"), body
    assert r.zrange(keys.tenant_active("acme"), 0, -1) == [held["request_id"]]


def test_a_tenant_at_max_streams_gets_404_for_an_unknown_group(auth_stack: Stack) -> None:
    base = auth_stack.base_url
    acme = tenant_key(base)
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_streams": 1}, headers=ADMIN)[0] == 200
    assert call("POST", f"{base}/v1/sessions/s1/requests", {"prompt": "x", "max_tokens": 2}, headers=acme)[0] == 202
    host, port = base.removeprefix("http://").split(":")
    held = http.client.HTTPConnection(host, int(port), timeout=30)  # a session's stream stays open
    try:
        held.request("GET", "/v1/sessions/s1/events", headers=acme)
        assert held.getresponse().status == 200
        code, body = call("POST", f"{base}/v1/chat/completions", {**CHAT, "stream": True},
                          headers={**acme, "X-Group": "nope"})
        assert_unknown_group(code, body)
        code, body = call("POST", f"{base}/v1/chat/completions", {**CHAT, "stream": True}, headers=acme)
        assert (code, body["error"]["type"]) == (429, "tenant_limit"), body  # a known group: still refused
    finally:
        held.close()
