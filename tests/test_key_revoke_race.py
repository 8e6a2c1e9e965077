"""Concurrent revokes of one key: exactly one answers 200 and writes the audit entry, the others 404
(each used to read the key's digest before any removed it, and all answered 200 and audited)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings

ADMIN = {"Authorization": "Bearer admin-secret"}
KEYS = 20  # the race needs a few tries to show: the reviewer's repro revoked 10 of 20 keys "twice"
DELETES = 4  # concurrent revokes of each key


def test_concurrent_revokes_of_a_key_succeed_once_and_audit_once(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=0)
    try:
        base = stack.base_url
        created = [call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[1] for _ in range(KEYS)]
        with ThreadPoolExecutor(DELETES) as pool:
            codes = {k["key_id"]: sorted(pool.map(
                lambda _, kid=k["key_id"]: call("DELETE", f"{base}/v1/admin/keys/{kid}", headers=ADMIN)[0],
                range(DELETES))) for k in created}
        assert {kid: c for kid, c in codes.items() if c != [200] + [404] * (DELETES - 1)} == {}
        entries = call("GET", f"{base}/v1/admin/audit?limit=1000", headers=ADMIN)[1]["entries"]
        revokes = sorted(e["target"] for e in entries if e["action"] == "key.revoke")
        assert revokes == sorted(codes), "one key.revoke entry per key"
        for key in created:  # revoked: the key works no more, and nothing of it is left
            assert call("GET", f"{base}/v1/admin/stats", headers={"Authorization": f"Bearer {key['key']}"})[0] == 401
        assert call("GET", f"{base}/v1/admin/keys", headers=ADMIN)[1]["keys"] == []
        assert r.hlen(keys.API_KEY_IDS) == 0 and r.hlen(keys.API_KEYS) == 0
    finally:
        stack.stop()
