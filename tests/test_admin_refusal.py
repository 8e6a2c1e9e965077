"""Admin routes check the key before the body's fields and the query: no key is 401 and a tenant key is
403 whatever they say (a 422 would answer the tenant's probe of an admin route); the admin still gets the
422 that names its bad field. (A body that is not JSON at all is a 422 for anyone: api/services.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Stack, call, fast_settings

ADMIN = {"Authorization": "Bearer admin-secret"}
# Every admin-only route, each with a body or query that fails validation.
INVALID = [("PUT", "/v1/admin/tenants/acme", {"max_priority": 99}),
           ("PUT", "/v1/admin/groups/default", {"max_concurrency": -1}),
           ("POST", "/v1/admin/keys", {"tenant": "acme", "expires_in": -1}),
           ("POST", "/v1/admin/keys", {"nope": 1}),
           ("GET", "/v1/admin/audit?limit=0", None),
           ("GET", "/v1/admin/usage?since=nan", None),
           ("GET", "/v1/admin/stats/stream?interval=0", None)]


@pytest.fixture
def auth_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=0)
    yield running
    running.stop()


def test_a_tenant_key_on_an_admin_route_is_403_before_its_body_or_query_is_validated(auth_stack: Stack) -> None:
    base = auth_stack.base_url
    key = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[1]["key"]
    acme = {"Authorization": f"Bearer {key}"}
    for method, path, body in INVALID:
        assert call(method, f"{base}{path}", body)[0] == 401, path
        assert call(method, f"{base}{path}", body, headers=acme)[0] == 403, path
        assert call(method, f"{base}{path}", body, headers=ADMIN)[0] == 422, path


def test_the_admin_dependency_leaves_the_routes_documented_parameters_as_they_were(auth_stack: Stack) -> None:
    paths = call("GET", f"{auth_stack.base_url}/openapi.json")[1]["paths"]
    params = {p["name"] for p in paths["/v1/admin/audit"]["get"].get("parameters", [])}
    assert params == {"limit"}
    params = {p["name"] for p in paths["/v1/admin/stats/stream"]["get"].get("parameters", [])}
    assert params == {"interval", "token"}
    assert "requestBody" in paths["/v1/admin/tenants/{tenant}"]["put"]
