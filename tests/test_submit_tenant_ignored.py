"""With auth on, a tenant key's submit ignores the body's `tenant` whatever it holds (CONTRACT.md), as the
chat route ignores X-Tenant: a value that is not a name used to be a 422. Where the field is used (the
admin key submitting for a tenant) it is checked as before. The hot path (application/json) and FastAPI
(another JSON type) answer alike. Ignored means any JSON value: null, a number, an object or a list too (a
client that sends its optional fields as null); where it is used, only a name."""

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
        for tenant in (NOT_A_NAME, "", "t" * 65, "globex", None, 123, 1.5, True, {"x": 1}, ["acme"]):
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


def refused_alike_whatever_its_type(url: str, headers: dict[str, str], r: redis.Redis) -> None:
    """A used tenant field that is not a string: pydantic's 422, as before, on both paths; nothing stored."""
    for tenant in (None, 123, True, {"x": 1}, ["globex"]):
        body = {"prompt": "x", "max_tokens": 2, "tenant": tenant}
        hot = call("POST", url, body, headers={**headers, **HOT})
        routed = call("POST", url, body, headers={**headers, **ROUTED})
        message = "tenant: Input should be a valid string"
        assert hot == routed == (422, {"error": {"type": "invalid_request", "message": message}}), (tenant, hot, routed)
    assert r.keys("sg:{s:*}:r:*") == [], "a refused submit stored nothing"


def test_the_admin_keys_tenant_must_be_a_string(auth_stack: Stack, r: redis.Redis) -> None:
    refused_alike_whatever_its_type(f"{auth_stack.base_url}/v1/sessions/s-admin-types/requests", ADMIN, r)


def test_with_auth_off_the_tenant_must_be_a_string(stack: Stack, r: redis.Redis) -> None:
    url = f"{stack.base_url}/v1/sessions/s-open/requests"
    refused_alike_whatever_its_type(url, {}, r)
    code, reply = call("POST", url, {"prompt": "x", "max_tokens": 2, "tenant": NOT_A_NAME})
    assert code == 422 and reply["error"]["message"].startswith("tenant: String should match pattern"), reply
    code, reply = call("POST", url, {"prompt": "x", "max_tokens": 2, "tenant": "globex"})
    assert code == 202, reply
    assert call("GET", f"{stack.base_url}/v1/requests/{reply['request_id']}")[1]["tenant"] == "globex"
