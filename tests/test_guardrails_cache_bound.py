"""The tenant limits cache of an API process (api/guardrails.py) stays bounded (issue: every tenant name the
admin key submitted for stayed cached for good, stale after its ttl: 2,000 submits for distinct tenants left
2,000 entries). Stale entries are dropped as new ones are added, and the cache never holds more than
MAX_CACHED_TENANTS; a fresh entry is still served from the cache."""

from __future__ import annotations

import asyncio

import pytest

from sluicegate.api import guardrails
from sluicegate.api.auth import Principal
from sluicegate.api.guardrails import Guardrails
from sluicegate.scheduler.limits import write_limits
from sluicegate.sessions.connect import async_client
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings

ADMIN = {"Authorization": "Bearer admin-secret"}


def test_stale_entries_are_dropped_as_tenants_are_added(redis_url: str) -> None:
    now = [0.0]

    async def scenario() -> None:
        redis_client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            rails = Guardrails(redis_client, ttl=3.0, clock=lambda: now[0])
            for i in range(300):
                await rails.limits(f"t-{i}")
                now[0] += 0.1  # 30 s in all: each entry is stale 3 s after it was loaded
            assert len(rails.cached) <= 32, len(rails.cached)  # the old code: 300
            assert "t-0" not in rails.cached and "t-299" in rails.cached
            # a fresh entry is still what a check reads (a change made elsewhere shows only after the ttl)
            await write_limits(redis_client, "t-299", {"max_priority": 2})
            await rails.check_priority(Principal(admin=False, tenant="t-299"), 9)
        finally:
            await redis_client.aclose()

    asyncio.run(scenario())


def test_the_cache_never_holds_more_than_its_bound(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Distinct tenants all within the ttl (a burst): the oldest loaded go first."""
    monkeypatch.setattr(guardrails, "MAX_CACHED_TENANTS", 50, raising=False)

    async def scenario() -> None:
        redis_client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            rails = Guardrails(redis_client, ttl=3.0, clock=lambda: 0.0)
            for i in range(200):
                await rails.limits(f"b-{i}")
            assert len(rails.cached) == 50, len(rails.cached)  # the old code: 200
            assert list(rails.cached)[0] == "b-150" and "b-199" in rails.cached
        finally:
            await redis_client.aclose()

    asyncio.run(scenario())


def test_admin_submits_for_many_tenants_leave_a_bounded_cache(redis_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's reproduction through the API: the admin key submits for distinct tenant names."""
    monkeypatch.setattr(guardrails, "MAX_CACHED_TENANTS", 20, raising=False)
    stack = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=1)
    try:
        base = stack.base_url
        for i in range(60):
            code, reply = call("POST", f"{base}/v1/sessions/gc-{i}/requests",
                               {"prompt": "x", "max_tokens": 1, "tenant": f"tf-{i}"}, headers=ADMIN)
            assert code == 202, reply
        cached = stack._server.config.app.state.services.guardrails.cached  # type: ignore[union-attr]
        assert len(cached) <= 20, len(cached)  # the old code: 60
    finally:
        stack.stop()

