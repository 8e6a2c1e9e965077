"""Tenancy review fixes: a tenant limit of 0 admits nothing until an operator raises it: still the contract's
429 `tenant_limit` with its Retry-After, but its message says so (it told the client to wait for a place of
its own to free, with none open: "submit again when one ends", "close one first"); the admin bodies refuse JSON booleans
where they take numbers (pydantic's lax mode took `true` as 1: a one-second key, a cap of 1) and an
`expires_in` under a second; an over-long priority string is the usual priority 422, not Python's text."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest
import redis

from sluicegate.api.schemas import parse_priority
from tests.helpers import Stack, call, stored_requests

ADMIN = {"Authorization": "Bearer admin-secret"}
PRIORITY_MESSAGE = "priority must be 0..9 or low|normal|high|critical"
CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def exchange(stack: Stack, method: str, path: str, headers: dict[str, str],
             body: Any = None) -> tuple[int, str | None, Any]:
    """Status, Retry-After and the JSON body (None for a stream that opened: it is not read)."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body),
                           headers={**headers, "content-type": "application/json"})
        response = connection.getresponse()
        payload = None if response.status == 200 and method == "GET" else json.loads(response.read() or b"null")
        return response.status, response.getheader("Retry-After"), payload
    finally:
        connection.close()


def assert_never_admitted(answer: tuple[int, str | None, Any], limit: str) -> None:
    status, retry_after, body = answer
    wait = {"max_queued": "1", "max_streams": "5"}[limit]  # CONTRACT.md: a 429 with a Retry-After
    assert (status, retry_after, body["error"]["type"]) == (429, wait, "tenant_limit"), answer
    assert f"its {limit} is 0" in body["error"]["message"], answer


def tenant_key(stack: Stack, tenant: str) -> dict[str, str]:
    code, created = call("POST", f"{stack.base_url}/v1/admin/keys", {"tenant": tenant}, headers=ADMIN)
    assert code == 201, created
    return {"Authorization": f"Bearer {created['key']}"}


def put_limits(stack: Stack, **limits: int | None) -> None:
    code, reply = call("PUT", f"{stack.base_url}/v1/admin/tenants/acme", limits, headers=ADMIN)
    assert code == 200, reply


def test_max_queued_0_says_so_on_every_submit_and_stores_nothing(idle_auth_stack: Stack, r: redis.Redis) -> None:
    acme = tenant_key(idle_auth_stack, "acme")
    put_limits(idle_auth_stack, max_queued=0)
    before = stored_requests(r)
    assert_never_admitted(exchange(idle_auth_stack, "POST", "/v1/sessions/s-acme/requests", acme,
                                   {"prompt": "x", "max_tokens": 2}), "max_queued")
    assert_never_admitted(exchange(idle_auth_stack, "POST", "/v1/chat/completions", acme, CHAT), "max_queued")
    assert_never_admitted(exchange(idle_auth_stack, "POST", "/v1/chat/completions", acme, {**CHAT, "stream": True}),
                          "max_queued")
    assert stored_requests(r) == before
    # the admin's request for the tenant is never refused; a limit of 1 is still the retryable 429
    status, _, reply = exchange(idle_auth_stack, "POST", "/v1/sessions/s-admin/requests", ADMIN,
                                {"prompt": "x", "max_tokens": 2, "tenant": "acme"})
    assert status == 202, reply
    put_limits(idle_auth_stack, max_queued=2)
    assert exchange(idle_auth_stack, "POST", "/v1/sessions/s-acme/requests", acme, {"prompt": "x"})[0] == 202
    status, retry_after, reply = exchange(idle_auth_stack, "POST", "/v1/sessions/s-acme/requests", acme,
                                          {"prompt": "x"})
    assert (status, retry_after, reply["error"]["type"]) == (429, "1", "tenant_limit"), reply


def test_max_streams_0_says_so_on_every_stream(idle_auth_stack: Stack, r: redis.Redis) -> None:
    acme = tenant_key(idle_auth_stack, "acme")
    status, _, submitted = exchange(idle_auth_stack, "POST", "/v1/sessions/s-acme/requests", acme, {"prompt": "x"})
    assert status == 202, submitted
    rid = submitted["request_id"]
    put_limits(idle_auth_stack, max_streams=0)
    urls = ["/v1/sessions/s-acme/events", f"/v1/requests/{rid}/events"]
    for scope in ({"session_id": "s-acme"}, {"request_id": rid}):  # a stream token's URL (the route, not the hot path)
        code, minted = call("POST", f"{idle_auth_stack.base_url}/v1/stream-tokens", scope, headers=acme)
        assert code == 201, minted
        urls.append(minted["events_url"])
    for url in urls:
        assert_never_admitted(exchange(idle_auth_stack, "GET", url, acme if "token=" not in url else {}), "max_streams")
    before = stored_requests(r)
    assert_never_admitted(exchange(idle_auth_stack, "POST", "/v1/chat/completions", acme, {**CHAT, "stream": True}),
                          "max_streams")
    assert stored_requests(r) == before
    # a submit is no stream; the admin's streams are not limited
    assert exchange(idle_auth_stack, "POST", "/v1/sessions/s-acme/requests", acme, {"prompt": "x"})[0] == 202
    assert exchange(idle_auth_stack, "GET", f"/v1/requests/{rid}/events", ADMIN)[0] == 200


def test_a_key_body_refuses_booleans_and_under_half_a_second(idle_auth_stack: Stack) -> None:
    base = idle_auth_stack.base_url
    for value in (True, False, 1e-9, 0.49):  # `true` made a key of one second, `1e-9` one already expired
        code, reply = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme", "expires_in": value}, headers=ADMIN)
        assert code == 422 and reply["error"]["message"].startswith("expires_in: "), (value, code, reply)
    for value in (0.5, 1):  # the floor (api/schemas.py MIN_KEY_SECONDS) and above
        code, reply = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme", "expires_in": value}, headers=ADMIN)
        assert code == 201, reply


def test_a_tenant_body_refuses_booleans_as_numbers(idle_auth_stack: Stack) -> None:
    base = idle_auth_stack.base_url
    put_limits(idle_auth_stack, max_queued=5, max_streams=3)
    for field in ("weight", "max_queued", "max_streams"):
        for value in (True, False):
            code, reply = call("PUT", f"{base}/v1/admin/tenants/acme", {field: value}, headers=ADMIN)
            assert code == 422 and reply["error"]["message"].startswith(f"{field}: "), (field, value, code, reply)
    tenants = {t["tenant"]: t for t in call("GET", f"{base}/v1/admin/tenants", headers=ADMIN)[1]["tenants"]}
    assert {k: tenants["acme"][k] for k in ("weight", "max_queued", "max_streams")} == {
        "weight": 1.0, "max_queued": 5, "max_streams": 3}


def test_a_group_body_refuses_booleans_as_numbers(idle_auth_stack: Stack) -> None:
    base = idle_auth_stack.base_url
    for field in ("requests_per_second", "tokens_per_second", "burst", "max_concurrency", "burst_tokens"):
        code, reply = call("PUT", f"{base}/v1/admin/groups/g1", {field: True}, headers=ADMIN)
        assert code == 422 and reply["error"]["message"].startswith(f"{field}: "), (field, code, reply)
    code, reply = call("PUT", f"{base}/v1/admin/groups/g1", {"deadlines_ms": {"high": True}}, headers=ADMIN)
    assert code == 422 and reply["error"]["message"].startswith("deadlines_ms: "), reply
    code, reply = call("PUT", f"{base}/v1/admin/groups/g1", {"max_concurrency": 2, "requests_per_second": 1.5,
                                                             "deadlines_ms": {"high": 500}}, headers=ADMIN)
    assert code == 200 and reply["quota"] == {"max_concurrency": 2, "requests_per_second": 1.5}, reply


@pytest.mark.parametrize("text", ["1" * 5000, "0" * 17 + "5", "\u00b2", "\u0663"])
def test_parse_priority_refuses_long_or_non_ascii_digits_with_its_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"^priority must be 0\.\.9 or low\|normal\|high\|critical$"):
        parse_priority(text)


def test_parse_priority_still_takes_digits_and_names() -> None:
    assert [parse_priority(v) for v in ("7", " 07 ", "0" * 15 + "3", "HIGH", 4, 6.0)] == [7, 7, 3, 7, 4, 6]


def test_a_5000_digit_priority_is_the_usual_422(idle_auth_stack: Stack) -> None:
    base = idle_auth_stack.base_url
    code, reply = call("POST", f"{base}/v1/sessions/s2/requests", {"prompt": "x", "tenant": "acme",
                                                                   "priority": "1" * 5000}, headers=ADMIN)
    assert (code, reply["error"]["message"]) == (422, f"priority: {PRIORITY_MESSAGE}"), reply
    code, reply = call("POST", f"{base}/v1/chat/completions", CHAT, headers={**ADMIN, "X-Priority": "1" * 5000})
    assert (code, reply["error"]["message"]) == (422, f"X-Priority: {PRIORITY_MESSAGE}"), reply


def test_a_submit_or_chat_budget_or_deadline_given_as_a_boolean_is_a_422(idle_auth_stack: Stack,
                                                                          r: redis.Redis) -> None:
    """pydantic's lax mode took `true` as 1: a budget of one token, a deadline of 1 ms (a request then judged
    missed at once)."""
    before = stored_requests(r)
    for field in ("max_tokens", "deadline_ms"):
        code, reply = call("POST", f"{idle_auth_stack.base_url}/v1/sessions/s-bool/requests",
                           {"prompt": "x", field: True}, headers=ADMIN)
        assert code == 422 and reply["error"]["message"].startswith(f"{field}: "), (field, code, reply)
    for field in ("max_tokens", "max_completion_tokens"):
        code, reply = call("POST", f"{idle_auth_stack.base_url}/v1/chat/completions", {**CHAT, field: True},
                           headers=ADMIN)
        assert code == 422 and field in reply["error"]["message"], (field, code, reply)
    assert stored_requests(r) == before
