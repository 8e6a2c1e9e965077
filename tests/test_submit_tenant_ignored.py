"""With auth on, a tenant key's submit ignores the body's `tenant` whatever it holds (CONTRACT.md), as the
chat route ignores X-Tenant: a value that is not a name used to be a 422. Where the field is used (the
admin key submitting for a tenant) it is checked as before. The hot path (application/json) and FastAPI
(another JSON type) answer alike."""

from __future__ import annotations

import redis

from tests.helpers import Stack, call
from tests.test_auth import ADMIN

HOT = {"content-type": "application/json"}  # api/hot_path.py
ROUTED = {"content-type": "application/vnd.api+json"}  # FastAPI's route
NOT_A_NAME = "alice@example.com"


def test_a_tenant_keys_submit_ignores_the_tenant_field(auth_stack: Stack, r: redis.Redis) -> None:
    base = auth_stack.base_url
    key = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[1]["key"]
    acme = {"Authorization": f"Bearer {key}"}
    for path, kind in ((HOT, "hot"), (ROUTED, "routed")):
        for tenant in (NOT_A_NAME, "", "t" * 65, "globex"):
            body = {"prompt": "x", "max_tokens": 2, "tenant": tenant}
            code, reply = call("POST", f"{base}/v1/sessions/s-{kind}/requests", body, headers={**acme, **path})
            assert code == 202, (kind, tenant, code, reply)
            assert call("GET", f"{base}/v1/requests/{reply['request_id']}", headers=acme)[1]["tenant"] == "acme"


def test_the_admin_keys_tenant_is_checked_alike_on_both_paths(auth_stack: Stack, r: redis.Redis) -> None:
    base = auth_stack.base_url
    url = f"{base}/v1/sessions/s-admin/requests"
    body = {"prompt": "x", "max_tokens": 2, "tenant": NOT_A_NAME}
    hot = call("POST", url, body, headers={**ADMIN, **HOT})
    routed = call("POST", url, body, headers={**ADMIN, **ROUTED})
    message = "tenant: String should match pattern '^[A-Za-z0-9._-]{1,64}$'"  # pydantic's, as before
    assert hot == routed == (422, {"error": {"type": "invalid_request", "message": message}})
    assert r.keys("sg:{s:*}:r:*") == [], "a refused submit stored nothing"
    code, reply = call("POST", url, {**body, "tenant": "globex"}, headers=ADMIN)
    assert code == 202, reply
    assert call("GET", f"{base}/v1/requests/{reply['request_id']}", headers=ADMIN)[1]["tenant"] == "globex"
