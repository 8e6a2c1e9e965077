"""API keys: with auth on, every route wants a key; the admin key does everything; a tenant key acts
as its tenant only (its sessions and requests, never the admin routes); a revoked key stops working.
An unauthenticated caller learns nothing about its body (401 before any 422)."""

from __future__ import annotations

import urllib.error
import urllib.request

import redis

from tests.helpers import Stack, call, fast_settings, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_keys_scope_every_route(auth_stack: Stack, r: redis.Redis) -> None:
    base = auth_stack.base_url
    submit_url = f"{base}/v1/sessions/s-acme/requests"
    # no key, a wrong key: 401 everywhere, even for a body that is itself invalid
    for method, url, body in [("POST", submit_url, {"prompt": "x"}), ("POST", f"{base}/v1/chat/completions", CHAT),
                              ("GET", f"{base}/v1/admin/stats", None)]:
        assert call(method, url, body)[0] == 401, url
        assert call(method, url, body, headers={"Authorization": "Bearer nope"})[0] == 401, url
    assert call("POST", f"{base}/v1/chat/completions", raw=b"{not json")[0] == 401
    assert r.keys("sg:{s:*}:r:*") == []

    code, created = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)
    assert code == 201 and created["tenant"] == "acme"
    acme = {"Authorization": f"Bearer {created['key']}"}
    code, other = call("POST", f"{base}/v1/admin/keys", {"tenant": "globex"}, headers=ADMIN)
    globex = {"Authorization": f"Bearer {other['key']}"}

    # a tenant key submits as its tenant, whatever the body says, and reads its own stream
    code, reply = call("POST", submit_url, {"prompt": "x", "max_tokens": 3, "tenant": "globex"}, headers=acme)
    assert code == 202, reply
    rid = reply["request_id"]
    assert call("GET", f"{base}/v1/requests/{rid}", headers=acme)[1]["tenant"] == "acme"
    # ... but not another tenant's request or session, and not the admin routes
    assert call("GET", f"{base}/v1/requests/{rid}", headers=globex)[0] == 404
    assert call("POST", submit_url, {"prompt": "y"}, headers=globex)[0] == 403
    assert call("GET", f"{base}/v1/admin/stats", headers=acme)[0] == 403
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"weight": 9}, headers=acme)[0] == 403
    # the admin key sees everything
    assert call("GET", f"{base}/v1/requests/{rid}", headers=ADMIN)[0] == 200
    assert call("GET", f"{base}/v1/admin/stats", headers=ADMIN)[0] == 200

    # revoked: the key stops working at once
    assert call("DELETE", f"{base}/v1/admin/keys/{created['key_id']}", headers=ADMIN)[0] == 200
    assert call("GET", f"{base}/v1/requests/{rid}", headers=acme)[0] == 401
    assert call("DELETE", f"{base}/v1/admin/keys/{created['key_id']}", headers=ADMIN)[0] == 404
    wait_for(lambda: call("GET", f"{base}/v1/requests/{rid}", headers=ADMIN)[1]["status"] == "done",
             what="the request to finish")


def test_a_key_with_non_ascii_characters_is_a_401_not_a_500(auth_stack: Stack) -> None:
    """Found by reading (issue 12): hmac.compare_digest raises on non-ASCII strings."""
    import http.client

    host, port = auth_stack.base_url.removeprefix("http://").split(":")
    for token in (b"cl\xc3\xa9", b"\xff\xfe", "admin-secreté".encode("latin-1")):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.putrequest("GET", "/v1/admin/stats")
            conn.putheader("Authorization", b"Bearer " + token)
            conn.endheaders()
            response = conn.getresponse()
            assert response.status == 401, (token, response.status, response.read())
        finally:
            conn.close()


def test_metrics_need_the_admin_key_or_the_metrics_key(redis_url: str, r: redis.Redis) -> None:
    """With auth on, /metrics (queue depths, every tenant's traffic) is for operators: the admin key, or
    --metrics-key for a Prometheus scraper; a tenant key is refused."""
    stack = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret", metrics_key="scrape-me")).start(
        workers=0)
    try:
        base = stack.base_url
        tenant = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[1]["key"]
        for headers, status in (({}, 401), ({"Authorization": f"Bearer {tenant}"}, 403),
                                ({"Authorization": "Bearer wrong"}, 401), (ADMIN, 200),
                                ({"Authorization": "Bearer scrape-me"}, 200)):
            request = urllib.request.Request(f"{base}/metrics", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    code, text = response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                code, text = error.code, ""
            assert code == status, (headers, code)
            assert code != 200 or "sluicegate_requests_total" in text
        code, _ = call("GET", f"{base}/v1/admin/stats", headers={"Authorization": "Bearer scrape-me"})
        assert code == 401  # the metrics key reads /metrics and nothing else
    finally:
        stack.stop()


def test_what_a_configuration_leaves_open_is_said_at_start() -> None:
    from sluicegate.api.app import exposure_warnings
    from sluicegate.settings import Settings

    assert exposure_warnings(Settings()) == []  # loopback, auth off: the default
    assert exposure_warnings(Settings(auth=True, admin_key="k")) == []
    assert "no --admin-key" in exposure_warnings(Settings(auth=True))[0]
    assert "anyone who reaches this port" in exposure_warnings(Settings(host="0.0.0.0", auth=False))[0]


def test_a_session_stream_ends_when_its_id_is_recycled_for_another_tenant(redis_url: str) -> None:
    """A tenant's session stream left open past the session's TTL: the id, recycled for another tenant,
    starts its event ids at 1 again on the same channel. The stream ends at that tenant's first event
    instead of delivering its events past the old cursor (its requests, output and usage); the old
    tenant's reconnect is a 404."""
    import http.client
    import json
    import threading

    stack = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret", session_ttl=1,
                                sse_ping_seconds=30.0)).start(workers=1)
    try:
        base = stack.base_url
        keys = [call("POST", f"{base}/v1/admin/keys", {"tenant": t}, headers=ADMIN)[1]["key"] for t in ("acme", "evil")]
        acme, evil = ({"Authorization": f"Bearer {k}"} for k in keys)
        code, first = call("POST", f"{base}/v1/sessions/shared/requests", {"prompt": "x", "max_tokens": 2},
                           headers=acme)
        assert code == 202
        rid = first["request_id"]
        wait_for(lambda: call("GET", f"{base}/v1/requests/{rid}", headers=acme)[1]["status"] == "done",
                 what="the first request's end")
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/v1/sessions/shared/events", headers=acme)
        response = conn.getresponse()
        assert response.status == 200
        lines: list[bytes] = []
        ended = threading.Event()

        def read() -> None:
            while line := response.readline():
                lines.append(line)
            ended.set()

        threading.Thread(target=read, daemon=True).start()
        wait_for(lambda: any(line.startswith(b"data: ") and b'"tokens"' in line for line in lines),
                 what="the stream's backlog")
        seen = len(lines)
        wait_for(lambda: call("POST", f"{base}/v1/sessions/shared/requests", {"prompt": "y", "max_tokens": 20},
                              headers=evil)[0] == 202, timeout=10, interval=0.2, what="the id's recycling")
        assert ended.wait(10), "the stream stayed open on another tenant's session"
        later = [json.loads(line[6:]) for line in lines[seen:] if line.startswith(b"data: ")]
        assert later == [], later  # nothing of the new owner's
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/v1/sessions/shared/events", headers={**acme, "Last-Event-ID": "4"})
        assert conn.getresponse().status == 404
    finally:
        stack.stop()
