"""Admin routes check the key before the body's fields and the query: no key is 401 and a tenant key is
403 whatever they say (a 422 would answer the tenant's probe of an admin route); the admin still gets the
422 that names its bad field. So too for a body that is not JSON at all, which FastAPI answers before it
solves the dependencies: the error handlers run the route's key checks first (api/errors.py)."""

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
# Every admin route that takes a body, and bodies FastAPI refuses before it solves the dependencies.
BODY_ROUTES = [("PUT", "/v1/admin/tenants/acme"), ("PUT", "/v1/admin/groups/default"), ("POST", "/v1/admin/keys")]
NOT_JSON = [(b"not json", "application/json", 422), (b"{\"weight\": ", "application/vnd.api+json", 422),
            (b"\xff\xfe{", "application/json", 400)]  # not even text: FastAPI's 400


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


def test_a_body_that_is_not_json_is_401_or_403_before_its_422(auth_stack: Stack) -> None:
    base = auth_stack.base_url
    key = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[1]["key"]
    acme = {"Authorization": f"Bearer {key}"}
    for method, path in BODY_ROUTES:
        for raw, content_type, status in NOT_JSON:
            url, what = f"{base}{path}", (path, raw, content_type)
            assert call(method, url, raw=raw, headers={"content-type": content_type})[0] == 401, what
            bad = {"content-type": content_type, "Authorization": "Bearer nope"}
            assert call(method, url, raw=raw, headers=bad)[0] == 401, what
            assert call(method, url, raw=raw, headers={"content-type": content_type, **acme})[0] == 403, what
            code, reply = call(method, url, raw=raw, headers={"content-type": content_type, **ADMIN})
            assert code == status and reply["error"]["type"] == "invalid_request", (what, code, reply)


def test_every_key_checked_route_checks_the_key_before_a_body_that_is_not_json(auth_stack: Stack) -> None:
    # The tenants' own routes too (their key check is a dependency: api/services.py `check_keys`); the
    # hot path hands a submit whose body does not parse to FastAPI (api/hot_path.py).
    base = auth_stack.base_url
    key = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[1]["key"]
    acme = {"Authorization": f"Bearer {key}"}
    for path in ("/v1/sessions/s-acme/requests", "/v1/stream-tokens"):
        for raw, content_type, status in NOT_JSON:
            what = (path, raw, content_type)
            assert call("POST", f"{base}{path}", raw=raw, headers={"content-type": content_type})[0] == 401, what
            assert call("POST", f"{base}{path}", raw=raw, headers={"content-type": content_type, **acme})[0] == status
    # No route, or not this method: answered as before (only errors about the body wait for the key).
    assert call("POST", f"{base}/v1/admin/nowhere", raw=b"not json")[0] == 404
    assert call("POST", f"{base}/v1/admin/tenants/acme", raw=b"not json")[0] == 405
