"""Tenant guardrails and key management (issue 12): keys are listed without their secret, expire, and
note their last use without a write per request; a tenant key is held to its tenant's `max_priority`
(403 `priority_not_allowed`), `max_queued` and `max_streams` (429 `tenant_limit` with Retry-After), and a refused
request stores nothing. The admin key, and every caller with auth off, is not limited."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import time
from collections.abc import Iterator

import pytest
import redis

from sluicegate.api.auth import Principal
from sluicegate.api.errors import ApiError
from sluicegate.api.guardrails import Guardrails
from sluicegate.scheduler.limits import TenantLimits, write_limits
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, stored_requests, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
def auth_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=1)
    yield running
    running.stop()


def new_key(base: str, tenant: str, **extra: object) -> dict[str, str]:
    code, created = call("POST", f"{base}/v1/admin/keys", {"tenant": tenant, **extra}, headers=ADMIN)
    assert code == 201, created
    return {"Authorization": f"Bearer {created['key']}", "key_id": created["key_id"], "key": created["key"]}


def bearer(key: dict[str, str]) -> dict[str, str]:
    return {"Authorization": key["Authorization"]}


def listed(base: str) -> dict[str, dict]:
    code, body = call("GET", f"{base}/v1/admin/keys", headers=ADMIN)
    assert code == 200, body
    return {k["key_id"]: k for k in body["keys"]}


def data_keys(r: redis.Redis) -> list[str]:
    """Every data-plane key (sessions, requests, their logs and metrics)."""
    return list(r.keys("sg:{s:*"))


def assert_error(code: int, body: dict, status: int, type_: str) -> None:
    assert code == status and body["error"]["type"] == type_, (code, body)


# ---- keys -------------------------------------------------------------------------------------
def test_keys_are_listed_without_their_secret(auth_stack: Stack, r: redis.Redis) -> None:
    base = auth_stack.base_url
    for bad in (0, -5, "soon", 1e12):
        code, reply = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme", "expires_in": bad}, headers=ADMIN)
        assert_error(code, reply, 422, "invalid_request")
    acme = new_key(base, "acme")
    code, raw = call("GET", f"{base}/v1/admin/keys", headers=ADMIN)
    assert code == 200
    text = json.dumps(raw)
    assert acme["key"] not in text and hashlib.sha256(acme["key"].encode()).hexdigest() not in text
    entry = listed(base)[acme["key_id"]]
    assert set(entry) >= {"key_id", "tenant", "created_at", "last_used_at", "expires_at"}
    assert entry["tenant"] == "acme" and entry["expires_at"] is None and entry["last_used_at"] is None
    assert abs(entry["created_at"] - time.time()) < 30
    # admin only
    assert_error(*call("GET", f"{base}/v1/admin/keys", headers=bearer(acme)), 403, "forbidden")
    assert_error(*call("GET", f"{base}/v1/admin/keys"), 401, "unauthorized")

    # a use is noted, then not written again for about a minute (no write per request)
    assert call("GET", f"{base}/v1/requests/00nothing", headers=bearer(acme))[0] == 404
    used = listed(base)[acme["key_id"]]["last_used_at"]
    assert used is not None and abs(used - time.time()) < 30
    r.hset(keys.API_KEYS_USED, acme["key_id"], 1.0)  # a marker: a second write would replace it
    for _ in range(3):
        assert call("GET", f"{base}/v1/requests/00nothing", headers=bearer(acme))[0] == 404
    assert listed(base)[acme["key_id"]]["last_used_at"] == 1.0

    # revoked: gone from the listing, with its last use
    assert call("DELETE", f"{base}/v1/admin/keys/{acme['key_id']}", headers=ADMIN)[0] == 200
    assert acme["key_id"] not in listed(base)
    assert r.hget(keys.API_KEYS_USED, acme["key_id"]) is None


def test_an_expired_key_is_refused_like_an_unknown_one(auth_stack: Stack) -> None:
    base = auth_stack.base_url
    brief = new_key(base, "acme", expires_in=0.5)
    lasting = new_key(base, "acme", expires_in=3600)
    entry = listed(base)[brief["key_id"]]
    assert entry["expires_at"] == pytest.approx(entry["created_at"] + 0.5, abs=0.01) and not entry["expired"]
    assert call("GET", f"{base}/v1/requests/00nothing", headers=bearer(brief))[0] == 404  # still valid
    time.sleep(0.6)
    code, reply = call("GET", f"{base}/v1/requests/00nothing", headers=bearer(brief))
    assert_error(code, reply, 401, "unauthorized")
    assert "expired" in reply["error"]["message"]
    code, reply = call("POST", f"{base}/v1/sessions/s1/requests", {"prompt": "x"}, headers=bearer(brief))
    assert code == 401
    assert call("GET", f"{base}/v1/requests/00nothing", headers=bearer(lasting))[0] == 404
    assert listed(base)[brief["key_id"]]["expired"] is True


def test_key_listing_answers_with_auth_off(redis_url: str) -> None:
    """What the contract smoke checks: auth off (loopback default), every caller is the admin."""
    running = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)
    try:
        call("POST", f"{running.base_url}/v1/admin/keys", {"tenant": "acme"})
        code, body = call("GET", f"{running.base_url}/v1/admin/keys")
        assert code == 200 and [k["tenant"] for k in body["keys"]] == ["acme"]
    finally:
        running.stop()


# ---- max_priority -----------------------------------------------------------------------------
def test_max_priority_refuses_and_stores_nothing(auth_stack: Stack, r: redis.Redis) -> None:
    base = auth_stack.base_url
    acme, globex = new_key(base, "acme"), new_key(base, "globex")
    code, reply = call("PUT", f"{base}/v1/admin/tenants/acme", {"max_priority": "normal"}, headers=ADMIN)
    assert code == 200 and reply == {"tenant": "acme", "weight": 1.0, "max_priority": 5, "max_queued": None,
                                     "max_streams": None}
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_priority": 9}, headers=bearer(acme))[0] == 403

    for priority in (6, 9, "high", "critical"):
        code, reply = call("POST", f"{base}/v1/sessions/s-acme/requests", {"prompt": "x", "priority": priority},
                           headers=bearer(acme))
        assert_error(code, reply, 403, "priority_not_allowed")
        assert "max_priority 5" in reply["error"]["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for stream in (False, True):
        code, reply = call("POST", f"{base}/v1/chat/completions", {**chat, "stream": stream},
                           headers={**bearer(acme), "X-Priority": "9", "X-Session-Id": "s-chat"})
        assert_error(code, reply, 403, "priority_not_allowed")
    assert data_keys(r) == []  # nothing stored for any refused request

    # at the limit, another tenant, the admin key: accepted
    assert call("POST", f"{base}/v1/sessions/s-acme/requests", {"prompt": "x", "priority": 5, "max_tokens": 2},
                headers=bearer(acme))[0] == 202
    assert call("POST", f"{base}/v1/sessions/s-globex/requests", {"prompt": "x", "priority": 9, "max_tokens": 2},
                headers=bearer(globex))[0] == 202
    assert call("POST", f"{base}/v1/sessions/s-admin/requests",
                {"prompt": "x", "priority": 9, "max_tokens": 2, "tenant": "acme"}, headers=ADMIN)[0] == 202

    # the weight is kept by a limits-only PUT, and null goes back to the default
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"weight": 3}, headers=ADMIN)[1]["max_priority"] == 5
    code, reply = call("PUT", f"{base}/v1/admin/tenants/acme", {"max_priority": None, "max_streams": 4},
                       headers=ADMIN)
    assert reply == {"tenant": "acme", "weight": 3.0, "max_priority": 9, "max_queued": None, "max_streams": 4}
    tenants = {t["tenant"]: t for t in call("GET", f"{base}/v1/admin/tenants", headers=ADMIN)[1]["tenants"]}
    assert (tenants["acme"]["max_priority"], tenants["acme"]["max_streams"]) == (9, 4)
    assert (tenants["globex"]["max_priority"], tenants["globex"]["max_streams"]) == (9, None)
    assert call("POST", f"{base}/v1/sessions/s-acme/requests", {"prompt": "x", "priority": 9, "max_tokens": 2},
                headers=bearer(acme))[0] == 202


def test_a_capped_tenants_deadline_requests_carry_the_cap_to_the_scheduler(auth_stack: Stack,
                                                                          r: redis.Redis) -> None:
    """A request with a deadline (its own, or the chat route's X-Deadline-Ms) from a tenant below the
    highest class carries its max_priority to the scheduler, which never boosts it past that
    (tests/test_deadlines.py); none for an uncapped tenant or a request without a deadline."""
    base = auth_stack.base_url
    acme, globex = new_key(base, "acme"), new_key(base, "globex")
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_priority": 3}, headers=ADMIN)[0] == 200
    submitted = {}
    for name, key, body in [("capped", acme, {"priority": 2, "deadline_ms": 60_000}),
                            ("no-deadline", acme, {"priority": 2}),
                            ("uncapped", globex, {"priority": 2, "deadline_ms": 60_000})]:
        code, reply = call("POST", f"{base}/v1/sessions/cap-{name}/requests", {"prompt": "x", "max_tokens": 2, **body},
                           headers=bearer(key))
        assert code == 202, reply
        submitted[name] = reply["request_id"]
    code, reply = call("POST", f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}, headers={**bearer(acme), "X-Priority": "1", "X-Deadline-Ms": "60000",
                                                  "X-Session-Id": "cap-chat"})
    assert code == 200, reply
    submitted["chat"] = reply["id"].removeprefix("chatcmpl-")
    caps = {name: r.hget(keys.request(rid), "mx") for name, rid in submitted.items()}
    assert caps == {"capped": "3", "no-deadline": None, "uncapped": None, "chat": "3"}


def test_bad_guardrail_input_is_422_and_changes_nothing(auth_stack: Stack) -> None:
    base = auth_stack.base_url
    call("PUT", f"{base}/v1/admin/tenants/acme", {"max_priority": 4, "max_streams": 2}, headers=ADMIN)
    for body in ({"max_priority": 10}, {"max_priority": -1}, {"max_priority": "urgent"}, {"max_streams": -1},
                 {"max_streams": "many"}, {"max_queued": -1},
                 {"max_queued": 1.5}, {"weight": None}, {}, {"max_priority": 1, "weight": 0}):
        code, reply = call("PUT", f"{base}/v1/admin/tenants/acme", body, headers=ADMIN)
        assert_error(code, reply, 422, "invalid_request")
    tenants = {t["tenant"]: t for t in call("GET", f"{base}/v1/admin/tenants", headers=ADMIN)[1]["tenants"]}
    assert (tenants["acme"]["weight"], tenants["acme"]["max_priority"], tenants["acme"]["max_streams"]) == (1.0, 4, 2)


def test_limits_are_cached_for_a_few_seconds(redis_url: str) -> None:
    """Another process's change applies once the cache is older than its ttl; this process's at once."""
    now = [0.0]

    async def scenario() -> None:
        redis_client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            rails = Guardrails(redis_client, ttl=3.0, clock=lambda: now[0])
            acme = Principal(admin=False, tenant="acme")
            await rails.check_priority(acme, 9)
            await write_limits(redis_client, "acme", {"max_priority": 2})  # "another API process"
            await rails.check_priority(acme, 9)  # still cached
            now[0] = 3.5
            with pytest.raises(ApiError) as refused:
                await rails.check_priority(acme, 3)
            assert refused.value.status == 403 and refused.value.type == "priority_not_allowed"
            await write_limits(redis_client, "acme", {"max_priority": None})
            rails.invalidate("acme")
            await rails.check_priority(acme, 9)
            assert await rails.limits("acme") == TenantLimits()
            await rails.check_priority(Principal(admin=True), 9)  # the admin is never limited
        finally:
            await redis_client.aclose()

    asyncio.run(scenario())


# ---- max_streams ------------------------------------------------------------------------------
class OpenStream:
    """An SSE connection held open (the server counts it until the socket closes)."""

    def __init__(self, base: str, path: str, headers: dict[str, str], body: dict | None = None) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=30)
        self.connection.request("GET" if body is None else "POST", path, headers=headers,
                                body=None if body is None else json.dumps(body))
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.body = None if self.status == 200 else json.loads(self.response.read())

    def events(self) -> list[str]:
        """The event names (or chat data lines) up to the end of the stream."""
        names = []
        while line := self.response.readline():
            if line.startswith(b"event: "):
                names.append(line[7:].strip().decode())
                if names[-1] in ("done", "error", "cancelled"):
                    break
            elif line.startswith(b"data: [DONE]"):
                names.append("[DONE]")
                break
        self.close()
        return names

    def close(self) -> None:
        self.connection.close()


def open_streams(base: str) -> dict[str, int]:
    return call("GET", f"{base}/v1/admin/stats", headers=ADMIN)[1]["api_process"]["open_streams_by_tenant"]


def test_max_streams_refuses_a_stream_over_the_limit(auth_stack: Stack, r: redis.Redis) -> None:
    base = auth_stack.base_url
    acme, globex = new_key(base, "acme"), new_key(base, "globex")
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_streams": 2}, headers=ADMIN)[0] == 200
    code, reply = call("POST", f"{base}/v1/sessions/s-acme/requests", {"prompt": "x", "max_tokens": 2},
                       headers=bearer(acme))
    assert code == 202
    rid = reply["request_id"]
    # a session's stream stays open (a request's ends with it)
    held = [OpenStream(base, "/v1/sessions/s-acme/events", bearer(acme)) for _ in range(2)]
    refused: list[OpenStream] = []
    try:
        assert [s.status for s in held] == [200, 200]
        assert open_streams(base) == {"acme": 2}
        for path in ("/v1/sessions/s-acme/events", f"/v1/requests/{rid}/events"):
            refused.append(OpenStream(base, path, bearer(acme)))
            assert refused[-1].status == 429, refused[-1].body
            assert refused[-1].body["error"]["type"] == "tenant_limit"
            assert int(refused[-1].response.getheader("Retry-After")) > 0
        # a streamed chat is refused before anything is stored; a non-streamed one is not a stream
        before = stored_requests(r)
        code, reply = call("POST", f"{base}/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
                           headers={**bearer(acme), "X-Session-Id": "s-chat"})
        assert_error(code, reply, 429, "tenant_limit")
        assert stored_requests(r) == before
        code, reply = call("POST", f"{base}/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, headers=bearer(acme))
        assert code == 200 and reply["object"] == "chat.completion", reply
        # other tenants and the admin key are not held to acme's limit
        code, other = call("POST", f"{base}/v1/sessions/s-globex/requests", {"prompt": "x", "max_tokens": 2},
                           headers=bearer(globex))
        assert code == 202
        assert OpenStream(base, f"/v1/requests/{other['request_id']}/events", bearer(globex)).events()[-1] == "done"
        assert OpenStream(base, f"/v1/requests/{rid}/events", ADMIN).events()[-1] == "done"
    finally:
        for stream in held + refused:
            stream.close()
    # closed streams free their places
    wait_for(lambda: open_streams(base) == {}, what="the closed streams to be released")
    chat = OpenStream(base, "/v1/chat/completions", {**bearer(acme), "content-type": "application/json"},
                      {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
    assert chat.status == 200 and chat.events()[-1] == "[DONE]"
    wait_for(lambda: open_streams(base) == {}, what="the finished chat stream to be released")


# ---- max_queued -------------------------------------------------------------------------------
def test_max_queued_is_fleet_wide_and_frees_places_as_requests_end(redis_url: str, r: redis.Redis) -> None:
    """Nothing runs at first (no worker): three requests hold acme's three places, through either of two
    API processes; a fourth is a 429 that stores nothing. A cancel frees a place, and so does the end
    of every request once a worker runs them."""
    settings = fast_settings(redis_url, auth=True, admin_key="admin-secret")
    first = Stack(settings).start(workers=0)
    second = Stack(settings).start(scheduler=False, workers=0)
    try:
        acme, globex = new_key(first.base_url, "acme"), new_key(first.base_url, "globex")
        code, reply = call("PUT", f"{first.base_url}/v1/admin/tenants/acme", {"max_queued": 3}, headers=ADMIN)
        assert code == 200 and reply["max_queued"] == 3

        def submit_as(stack: Stack, key: dict[str, str], sid: str) -> tuple[int, dict]:
            return call("POST", f"{stack.base_url}/v1/sessions/{sid}/requests", {"prompt": "x", "max_tokens": 3},
                        headers=bearer(key))

        held = [submit_as(stack, acme, f"q{n}") for n, stack in enumerate((first, second, first))]
        assert [code for code, _ in held] == [202, 202, 202]
        before = data_keys(r)
        for stack in (first, second):
            code, reply = submit_as(stack, acme, "q-over")
            assert_error(code, reply, 429, "tenant_limit")
            assert "max_queued" in reply["error"]["message"]
            code, reply = call("POST", f"{stack.base_url}/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                               headers={**bearer(acme), "X-Session-Id": "q-chat"})
            assert_error(code, reply, 429, "tenant_limit")
        assert sorted(data_keys(r)) == sorted(before)  # nothing stored for a refused request
        # another tenant and the admin key are not held to acme's limit
        assert submit_as(first, globex, "q-globex")[0] == 202
        # acme at its limit, in globex's session: the session is not acme's at any count (403, not 429)
        code, reply = submit_as(second, acme, "q-globex")
        assert_error(code, reply, 403, "forbidden")
        assert submit_as(first, acme, "q-fresh")[0] == 429  # a session of its own: the limit
        code, by_admin = call("POST", f"{first.base_url}/v1/sessions/q-admin/requests",
                              {"prompt": "x", "max_tokens": 3, "tenant": "acme"}, headers=ADMIN)
        assert code == 202  # (it is acme's request all the same: it takes one of acme's places at once)

        # a cancelled request gives its place back (within the recheck interval)
        for rid in (held[0][1]["request_id"], by_admin["request_id"]):
            assert call("DELETE", f"{first.base_url}/v1/requests/{rid}", headers=ADMIN)[0] == 200
        wait_for(lambda: submit_as(second, acme, "q-after-cancel")[0] == 202, timeout=10,
                 what="a place freed by the cancel")
        assert submit_as(first, acme, "q-over")[0] == 429

        first.add_worker()  # every request runs and ends: all places free up at the next check
        wait_for(lambda: r.zcard(keys.tenant_active("acme")) == 3 and all(
            r.hget(keys.request(rid), "st") == "done" for rid in r.zrange(keys.tenant_active("acme"), 0, -1)),
            timeout=30, what="acme's runs to end")
        wait_for(lambda: submit_as(first, acme, "q-late0")[0] == 202, timeout=10, what="a place after the runs")
        assert [submit_as(first, acme, f"q-late{n}")[0] for n in (1, 2)] == [202, 202]  # one check freed all
    finally:
        second.stop()
        first.stop()
