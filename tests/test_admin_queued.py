"""A request the admin key submits for a tenant is that tenant's and counts in its `max_queued` from the
start (README, Tenant guardrails): the admin is never refused, but the tenant's own next submit is."""

from __future__ import annotations

import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings

ADMIN = {"Authorization": "Bearer admin-secret"}


def test_admin_submits_for_a_tenant_count_in_its_max_queued(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=0)  # nothing runs
    try:
        base = stack.base_url
        code, created = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)
        assert code == 201, created
        acme = {"Authorization": f"Bearer {created['key']}"}
        assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_queued": 2}, headers=ADMIN)[0] == 200

        by_admin = [call("POST", f"{base}/v1/sessions/adm{n}/requests",
                         {"prompt": "x", "max_tokens": 3, "tenant": "acme"}, headers=ADMIN) for n in range(3)]
        assert [code for code, _ in by_admin] == [202, 202, 202]  # the admin is never refused, past the limit too
        assert r.zcard(keys.tenant_active("acme")) == 3  # each took its place at once

        code, reply = call("POST", f"{base}/v1/sessions/own/requests", {"prompt": "x", "max_tokens": 3},
                           headers=acme)
        assert code == 429 and reply["error"]["type"] == "tenant_limit", (code, reply)
    finally:
        stack.stop()
