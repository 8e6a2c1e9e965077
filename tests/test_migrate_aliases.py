"""After `sluicegate migrate`, a client that still holds a request's old id (before the cluster layout) reaches
that request through `sg:alias:<old id>`: GET (with ?include=output), DELETE and /events answer as for the new
id, under the new id, with the same tenant checks; an old id with no alias, or whose request is gone, is a 404
that names the id asked for."""

from __future__ import annotations

import http.client
import io
from collections.abc import Iterator

import pytest
import redis

from sluicegate.migrate import migrate
from sluicegate.sessions import keys
from sluicegate.workers.engines.sim import sim_text
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, sse
from tests.test_migrate import TENANT, new, old_id, write_old_deployment

ADMIN = {"Authorization": "Bearer admin-secret"}


def status_of(base_url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A GET's status and (for anything but a stream) its body: for the event routes' refusals."""
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, b"" if response.status == 200 else response.read()
    finally:
        connection.close()


@pytest.fixture
def migrated(redis_url: str, r: redis.Redis) -> dict[str, str]:
    """The old deployment (tests/test_migrate.py) migrated: its old ids by name."""
    old = write_old_deployment(r, head_status="preempted")
    migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    return old


@pytest.fixture
def stack(redis_url: str) -> Iterator[Stack]:
    stack = Stack(fast_settings(redis_url)).start(workers=0)  # nothing runs: the queued ones stay queued
    try:
        yield stack
    finally:
        stack.stop()


def test_an_old_id_answers_for_its_request(migrated: dict[str, str], stack: Stack, r: redis.Redis) -> None:
    base, old = stack.base_url, migrated
    e1, q1, q2 = (new(old[name], "chat-a") for name in ("e1", "q1", "q2"))
    code, view = call("GET", f"{base}/v1/requests/{old['e1']}?include=output")
    assert code == 200, view
    assert view["request_id"] == e1 and view["status"] == "done" and view["tenant"] == TENANT
    assert view["output"] == sim_text("e1", 3)
    code, view = call("GET", f"{base}/v1/requests/{old['e2']}")
    assert code == 200 and view["request_id"] == new(old["e2"], "chat-b") and view["session_id"] == "chat-b"
    assert call("GET", f"{base}/v1/requests/{old['q1']}")[1]["request_id"] == q1

    events = list(sse(base, f"/v1/requests/{old['e1']}/events", timeout=30, until=lambda e: e.event == "done"))
    assert [e.event for e in events] == ["queued", "started", "token", "token", "token", "done"]
    assert {e.data["request_id"] for e in events} == {e1}

    code, view = call("DELETE", f"{base}/v1/requests/{old['q2']}")
    assert code == 200 and view["request_id"] == q2 and view["status"] == "cancelled"
    assert call("GET", f"{base}/v1/requests/{q2}")[1]["status"] == "cancelled"
    assert r.lrange(keys.session_queue("chat-a"), 0, -1) == [new(old["p"], "chat-a"), q1]
    code, error = call("DELETE", f"{base}/v1/requests/{old['q2']}")
    assert code == 409 and q2 in error["error"]["message"]

    unknown = old_id()
    gone = old["e2"]
    r.delete(keys.request(new(gone, "chat-b")))  # ended and expired: its alias may outlive it by a moment
    for rid in (unknown, gone):
        for method in ("GET", "DELETE"):
            code, error = call(method, f"{base}/v1/requests/{rid}")
            assert code == 404 and error["error"]["message"] == f"no request {rid!r}", (method, rid, error)
        code, body = status_of(base, f"/v1/requests/{rid}/events")
        assert code == 404 and f"no request {rid!r}".encode() in body, (rid, body)


def test_an_old_id_keeps_its_tenant(migrated: dict[str, str], redis_url: str, r: redis.Redis) -> None:
    """Resolved, the request is checked as when its new id is named: another tenant's key gets the same 404
    (naming the old id, not the new one), its owner's key and the admin key reach it."""
    old = migrated
    stack = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=0)
    try:
        base = stack.base_url
        tenant_keys = {t: call("POST", f"{base}/v1/admin/keys", {"tenant": t}, headers=ADMIN)[1]["key"]
                       for t in (TENANT, "globex")}
        acme = {"Authorization": f"Bearer {tenant_keys[TENANT]}"}
        globex = {"Authorization": f"Bearer {tenant_keys['globex']}"}
        e1, q1 = new(old["e1"], "chat-a"), new(old["q1"], "chat-a")
        for rid in (old["e1"], e1):
            code, error = call("GET", f"{base}/v1/requests/{rid}", headers=globex)
            assert code == 404 and error["error"]["message"] == f"no request {rid!r}", error
            code, body = status_of(base, f"/v1/requests/{rid}/events", globex)
            assert code == 404 and f"no request {rid!r}".encode() in body, body
        code, error = call("DELETE", f"{base}/v1/requests/{old['q1']}", headers=globex)
        assert code == 404 and error["error"]["message"] == f"no request {old['q1']!r}", error
        assert r.hget(keys.request(q1), "st") == "queued"
        assert call("GET", f"{base}/v1/requests/{old['e1']}", headers=acme)[1]["request_id"] == e1
        assert status_of(base, f"/v1/requests/{old['e1']}/events", acme)[0] == 200
        # the browser's way: a stream token asked for by the old id is the new id's, and opens its events
        for who, expected in ((globex, 404), (acme, 201)):
            code, minted = call("POST", f"{base}/v1/stream-tokens", {"request_id": old["e1"]}, headers=who)
            assert code == expected, minted  # old: 404 for acme too
        assert minted["events_url"].startswith(f"/v1/requests/{e1}/events?token=")
        assert status_of(base, minted["events_url"])[0] == 200
        assert call("GET", f"{base}/v1/requests/{old['q1']}", headers=ADMIN)[1]["request_id"] == q1
        code, view = call("DELETE", f"{base}/v1/requests/{old['q1']}", headers=acme)
        assert code == 200 and view["request_id"] == q1 and view["status"] == "cancelled"
    finally:
        stack.stop()
