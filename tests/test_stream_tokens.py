"""Browser-facing HTTP without a browser: a stream token opens exactly the one stream it was made for,
for its own tenant, until it expires or its key is revoked; the stats stream feeds the dashboard;
CORS answers the listed origins on every route (SSE, errors and the chat hot path included) and no
other origin. The browser itself drives them in tests/test_browser.py."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sluicegate.settings import BadSetting, from_env
from tests.helpers import Stack, call, fast_settings, sse

ADMIN = "admin-secret"
ORIGIN = "http://127.0.0.1:5173"
TTL = 2


@pytest.fixture
def secured(redis_url: str) -> Iterator[Stack]:
    """Auth on, CORS for ORIGIN, stream tokens good for 2 s."""
    stack = Stack(fast_settings(redis_url, auth=True, admin_key=ADMIN, cors_origins=ORIGIN,
                                stream_token_ttl=TTL)).start(workers=1)
    yield stack
    stack.stop()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def new_key(base: str, tenant: str) -> dict[str, Any]:
    code, reply = call("POST", f"{base}/v1/admin/keys", {"tenant": tenant}, headers=bearer(ADMIN))
    assert code == 201, reply
    return reply


def submit_as(base: str, key: str, session_id: str, max_tokens: int = 5, **body: Any) -> str:
    code, reply = call("POST", f"{base}/v1/sessions/{session_id}/requests",
                       {"prompt": "hi", "max_tokens": max_tokens, **body}, headers=bearer(key))
    assert code == 202, reply
    return reply["request_id"]


def mint(base: str, key: str | None, **scope: Any) -> tuple[int, Any]:
    return call("POST", f"{base}/v1/stream-tokens", scope, headers=bearer(key) if key else {})


def token_for(base: str, key: str, **scope: Any) -> dict[str, Any]:
    code, reply = mint(base, key, **scope)
    assert code == 201, reply
    return reply


def head(base: str, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and, unless it is an event stream, the body."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        found = {name.lower(): value for name, value in response.getheaders()}
        streaming = found.get("content-type", "").startswith("text/event-stream")
        return response.status, found, b"" if streaming else response.read()
    finally:
        connection.close()


def status(base: str, path: str) -> int:
    return head(base, "GET", path)[0]


def stats_events(base: str, path: str, count: int, headers: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """The first `count` `stats` events of the stats stream, parsed."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    event, seen = "", 0
    try:
        while seen < count:
            line = response.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "stats":
                seen += 1
                yield json.loads(line[6:])
    finally:
        connection.close()


def test_a_stream_token_opens_its_own_stream_and_no_other_route(secured: Stack) -> None:
    base = secured.base_url
    acme, globex = new_key(base, "acme")["key"], new_key(base, "globex")["key"]
    rid = submit_as(base, acme, "s1")
    submit_as(base, acme, "s2")
    by_request = token_for(base, acme, request_id=rid)
    assert by_request["scope"] == "request" and by_request["events_url"].startswith(f"/v1/requests/{rid}/events?token=")
    assert by_request["expires_at"] <= time.time() + TTL + 1
    events = list(sse(base, by_request["events_url"]))
    assert [e.data["index"] for e in events if e.event == "token"] == list(range(5)) and events[-1].event == "done"
    by_session = token_for(base, acme, session_id="s1")
    assert [e.event for e in sse(base, by_session["events_url"], until=lambda e: e.event == "done")][-1] == "done"

    request_token, session_token = by_request["token"], by_session["token"]
    # another stream, another kind of stream, a forged or broken token: 401, like any bad credential
    assert status(base, f"/v1/sessions/s1/events?token={request_token}") == 401
    assert status(base, f"/v1/requests/{rid}/events?token={session_token}") == 401
    assert status(base, f"/v1/sessions/s2/events?token={session_token}") == 401
    swapped = request_token.partition(".")[0] + "." + session_token.partition(".")[2]  # a payload, another's signature
    assert status(base, f"/v1/requests/{rid}/events?token={swapped}") == 401
    assert status(base, "/v1/sessions/s1/events?token=not-a-token") == 401
    # a token grants nothing but its stream: not the request, not the stats, not a submit
    assert status(base, f"/v1/requests/{rid}?token={request_token}") == 401
    assert status(base, f"/v1/admin/stats?token={session_token}") == 401
    assert status(base, f"/v1/admin/stats/stream?token={session_token}") == 401
    assert call("POST", f"{base}/v1/sessions/s1/requests?token={session_token}", {"prompt": "x"})[0] == 401

    # scoped to the caller's tenant: another tenant's session or request is not found, as its events are
    assert mint(base, globex, session_id="s1")[0] == 404
    assert mint(base, globex, request_id=rid)[0] == 404
    assert mint(base, acme, session_id="never-used")[0] == 404
    assert mint(base, None, session_id="s1")[0] == 401
    assert mint(base, acme, stats=True)[0] == 403  # the stats stream is the admin's
    assert mint(base, acme)[0] == 422 and mint(base, acme, session_id="s1", request_id=rid)[0] == 422
    admins = token_for(base, ADMIN, session_id="s1")  # the admin may follow any session
    assert status(base, admins["events_url"]) == 200


def test_a_token_opens_streams_until_it_expires_or_its_key_is_revoked(secured: Stack) -> None:
    base = secured.base_url
    record = new_key(base, "acme")
    acme = record["key"]
    submit_as(base, acme, "s1", max_tokens=3)
    token = token_for(base, acme, session_id="s1")
    live = sse(base, token["events_url"], timeout=15)
    assert next(live).event == "queued"
    time.sleep(max(token["expires_at"] - time.time(), 0) + 0.05)
    assert status(base, token["events_url"]) == 401  # expired: a reconnect needs a new token
    second = submit_as(base, acme, "s1", max_tokens=3)
    # a stream opened in time runs on past the expiry
    assert any(e.data["request_id"] == second and e.event == "done" for e in live)
    fresh = token_for(base, acme, session_id="s1")
    assert status(base, fresh["events_url"]) == 200
    assert call("DELETE", f"{base}/v1/admin/keys/{record['key_id']}", headers=bearer(ADMIN))[0] == 200
    code, body = head(base, "GET", fresh["events_url"])[::2]
    assert code == 401 and b"revoked" in body


def test_the_stats_stream_sends_the_stats_document_with_rates_and_shares(secured: Stack) -> None:
    base = secured.base_url
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"weight": 3}, headers=bearer(ADMIN))[0] == 200
    keys = {tenant: new_key(base, tenant)["key"] for tenant in ("acme", "globex")}
    for i in range(4):  # 2.5 s each, 4 at once: work runs for about 5 s (at 200 tokens, 1 s: a loaded host's
        for tenant, key in keys.items():  # first stats event came once it had all ended, running 0)
            submit_as(base, key, f"{tenant}-{i}", max_tokens=1000)
    url = token_for(base, ADMIN, stats=True)["events_url"] + "&interval=0.2"
    plain = call("GET", f"{base}/v1/admin/stats", headers=bearer(ADMIN))[1]
    for doc in stats_events(base, url, 40):
        if doc["tokens_per_second"]["total"] > 0 and len(doc["tenant_share"]) == 2 and doc["running"] > 0:
            break
    else:
        raise AssertionError("no event showed tokens flowing for both tenants while work ran")
    assert set(plain) <= set(doc)
    shares = {t["tenant"]: t for t in doc["tenant_share"]}
    assert shares["acme"]["weight_share"] == 0.75 and shares["globex"]["weight_share"] == 0.25
    assert abs(sum(t["token_share"] for t in shares.values()) - 1) < 0.01
    assert doc["tokens_per_second"]["by_group"]["default"] == doc["tokens_per_second"]["total"]
    # the admin key in a header works too; a tenant key or nothing does not
    assert next(stats_events(base, "/v1/admin/stats/stream", 1, bearer(ADMIN)))["workers"]
    assert head(base, "GET", "/v1/admin/stats/stream", bearer(keys["acme"]))[0] == 403
    assert status(base, "/v1/admin/stats/stream") == 401
    assert status(base, "/v1/admin/stats/stream?interval=0") == 401  # auth first: nothing about the query
    assert head(base, "GET", "/v1/admin/stats/stream?interval=0", bearer(ADMIN))[0] == 422


def test_cors_answers_the_listed_origins_on_every_route_and_no_other(secured: Stack) -> None:
    base = secured.base_url
    acme = new_key(base, "acme")["key"]
    preflight = {"origin": ORIGIN, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    code, headers, _ = head(base, "OPTIONS", "/v1/stream-tokens", preflight)
    assert code == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in headers["access-control-allow-headers"].lower()
    # an EventSource's reconnect carries Last-Event-ID: allowed
    code, headers, _ = head(base, "OPTIONS", "/v1/requests/x/events", {
        "origin": ORIGIN, "access-control-request-method": "GET", "access-control-request-headers": "last-event-id"})
    assert code == 200 and "last-event-id" in headers["access-control-allow-headers"].lower()
    code, headers, _ = head(base, "OPTIONS", "/v1/stream-tokens", {**preflight, "origin": "http://127.0.0.1:6666"})
    assert code == 400 and "access-control-allow-origin" not in headers

    body = json.dumps({"prompt": "hi", "max_tokens": 3}).encode()
    code, headers, _ = head(base, "POST", "/v1/sessions/s1/requests",
                            {"origin": ORIGIN, "content-type": "application/json", **bearer(acme)}, body)
    assert code == 202 and headers["access-control-allow-origin"] == ORIGIN
    token = token_for(base, acme, session_id="s1")
    code, headers, _ = head(base, "GET", token["events_url"], {"origin": ORIGIN})
    assert code == 200 and headers["access-control-allow-origin"] == ORIGIN  # SSE
    assert headers["content-type"].startswith("text/event-stream")
    code, headers, _ = head(base, "GET", "/v1/admin/stats", {"origin": ORIGIN})
    assert code == 401 and headers["access-control-allow-origin"] == ORIGIN  # errors are readable too
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    code, headers, _ = head(base, "POST", "/v1/chat/completions",
                            {"origin": ORIGIN, "content-type": "application/json", **bearer(acme)}, chat)
    assert code == 200 and headers["access-control-allow-origin"] == ORIGIN  # the hot path
    exposed = headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "x-should-retry" in exposed  # a browser SDK reads both (old: not the second)
    code, headers, _ = head(base, "GET", "/healthz", {"origin": "http://127.0.0.1:6666"})
    assert code == 200 and "access-control-allow-origin" not in headers


def test_without_cors_origins_no_cors_and_with_auth_off_tokens_are_optional(stack: Stack) -> None:
    base = stack.base_url
    code, headers, _ = head(base, "GET", "/healthz", {"origin": ORIGIN})
    assert code == 200 and not any(name.startswith("access-control-") for name in headers)
    rid = call("POST", f"{base}/v1/sessions/s1/requests", {"prompt": "hi", "max_tokens": 2})[1]["request_id"]
    token = token_for(base, "", request_id=rid)  # auth off: anyone may mint, and the token is not needed
    assert [e.event for e in sse(base, token["events_url"])][-1] == "done"
    assert [e.event for e in sse(base, f"/v1/requests/{rid}/events?token=whatever")][-1] == "done"
    assert next(stats_events(base, "/v1/admin/stats/stream", 1))["running"] >= 0


def test_the_dashboard_is_a_static_page_that_only_talks_to_its_own_origin(stack: Stack) -> None:
    code, headers, page = head(stack.base_url, "GET", "/dashboard")
    assert code == 200 and headers["content-type"].startswith("text/html")
    policy = headers["content-security-policy"]
    assert "connect-src 'self'" in policy and "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert b"/v1/stream-tokens" in page and b"EventSource" in page and b"sessionStorage" in page


@pytest.mark.parametrize("spec", ["app.example.com", "http://a.test/path", "ftp://a.test", "http://a.test,https://"])
def test_a_bad_cors_origin_is_refused_before_anything_starts(spec: str) -> None:
    with pytest.raises(BadSetting, match="cors_origins: .* is not an origin"):
        from_env(environ={}, cors_origins=spec)
    assert from_env(environ={}, cors_origins=f" {ORIGIN}, https://b.test:8443 ").cors_origin_list() == [
        ORIGIN, "https://b.test:8443"]

