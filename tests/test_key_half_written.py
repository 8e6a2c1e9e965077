"""An API key is two hash entries on two slots (its record in `sg:keys`, its id in `sg:keys:ids`), written and
removed in two steps: a store failing between them must leave nothing that works or that no revoke finds.

- A revoke that removed the record but not the id: the key's stream tokens are refused (they checked the id
  only, so a revoked key's tokens kept opening streams), and the admin's retried DELETE finishes the revoke
  and audits it (it answered 404 and the revocation was never audited).
- A create that wrote only its first entry: no live key the admin never saw (listed, and a 404 to every
  DELETE); an id with no record, which a DELETE removes.

A failure between the two writes is simulated on a real Valkey: one entry removed directly, or the hash the
second write goes to made a string (WRONGTYPE, a real error of the store at exactly that write)."""

from __future__ import annotations

import http.client
from typing import Any

import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call

ADMIN = {"Authorization": "Bearer admin-secret"}


def new_key(base: str) -> dict[str, Any]:
    code, reply = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)
    assert code == 201, reply
    return reply


def stream_status(base: str, path: str) -> int:
    """The status a stream route answers, its body (an event stream) left unread."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def revokes(base: str) -> list[str]:
    entries = call("GET", f"{base}/v1/admin/audit?limit=1000", headers=ADMIN)[1]["entries"]
    return [entry["target"] for entry in entries if entry["action"] == "key.revoke"]


def half_revoked(base: str, r: redis.Redis) -> tuple[dict[str, Any], str]:
    """A key of acme with a session stream token, then revoked halfway: its record gone, its id left."""
    key = new_key(base)
    headers = {"Authorization": f"Bearer {key['key']}"}
    code, reply = call("POST", f"{base}/v1/sessions/s/requests", {"prompt": "x", "max_tokens": 5}, headers=headers)
    assert code == 202, reply
    code, reply = call("POST", f"{base}/v1/stream-tokens", {"session_id": "s"}, headers=headers)
    assert code == 201, reply
    token = reply["token"]
    assert stream_status(base, f"/v1/sessions/s/events?token={token}") == 200
    assert r.hdel(keys.API_KEYS, r.hget(keys.API_KEY_IDS, key["key_id"])) == 1  # revoke's first write, not its second
    assert r.hexists(keys.API_KEY_IDS, key["key_id"])
    return key, token


def test_a_stream_token_of_a_key_whose_record_is_gone_is_refused(idle_auth_stack: Stack, r: redis.Redis) -> None:
    base = idle_auth_stack.base_url
    key, token = half_revoked(base, r)
    assert call("GET", f"{base}/v1/admin/stats", headers={"Authorization": f"Bearer {key['key']}"})[0] == 401  # dead
    assert stream_status(base, f"/v1/sessions/s/events?token={token}") == 401


def test_a_retried_revoke_finishes_a_half_done_one_and_audits_it(idle_auth_stack: Stack, r: redis.Redis) -> None:
    base = idle_auth_stack.base_url
    key, _ = half_revoked(base, r)
    code, reply = call("DELETE", f"{base}/v1/admin/keys/{key['key_id']}", headers=ADMIN)
    assert code == 200, reply
    assert revokes(base) == [key["key_id"]]
    assert not r.hexists(keys.API_KEY_IDS, key["key_id"])
    assert call("DELETE", f"{base}/v1/admin/keys/{key['key_id']}", headers=ADMIN)[0] == 404  # done once
    assert revokes(base) == [key["key_id"]]


def create_failing_at(base: str, r: redis.Redis, key: str) -> None:
    """A key's create whose write of `key` fails (WRONGTYPE: the hash is a string meanwhile): refused, and no
    key listed after it."""
    r.set(key, "not a hash")
    try:
        assert call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[0] != 201
    finally:
        r.delete(key)
    assert call("GET", f"{base}/v1/admin/keys", headers=ADMIN)[1]["keys"] == []


def test_a_create_failing_after_its_first_write_leaves_no_key_and_nothing_no_revoke_finds(
        idle_auth_stack: Stack, r: redis.Redis) -> None:
    base = idle_auth_stack.base_url
    # the id's write fails: no record may be left behind (the old order left a live key, listed, never revocable)
    create_failing_at(base, r, keys.API_KEY_IDS)
    assert r.hlen(keys.API_KEYS) == 0
    # the record's write fails: an id pointing at nothing, which a DELETE removes (and audits)
    create_failing_at(base, r, keys.API_KEYS)
    [key_id] = r.hkeys(keys.API_KEY_IDS)
    assert call("DELETE", f"{base}/v1/admin/keys/{key_id}", headers=ADMIN)[0] == 200
    assert revokes(base) == [key_id]
    assert r.hlen(keys.API_KEY_IDS) == 0
