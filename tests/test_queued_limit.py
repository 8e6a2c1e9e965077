"""`max_queued` counts every request the tenant has queued or running, not only those submitted since the
limit was set: setting it counts the tenant's live requests (found from the scheduler's per-tenant ready
sets and running runs, and the sessions' lite queues), and requests another API process admitted as
unlimited while its cached limits lagged are counted at the first check of the tenant's full set."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from sluicegate.api.admission import RECHECK_SECONDS
from sluicegate.scheduler.tenant_requests import live_requests
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
LONG = 2000  # tokens: 40 s at 50 tokens/s, so the running ones stay running


@pytest.fixture
def auth_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret",
                                  sim_tokens_per_second=50.0)).start(workers=1)  # 4 slots
    yield running
    running.stop()


def tenant_key(base: str) -> dict[str, str]:
    key = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[1]["key"]
    return {"Authorization": f"Bearer {key}"}


def submit(base: str, sid: str, headers: dict[str, str]) -> tuple[int, str | None]:
    code, reply = call("POST", f"{base}/v1/sessions/{sid}/requests", {"prompt": "x", "max_tokens": LONG},
                       headers=headers)
    return code, reply.get("request_id") if code == 202 else None


def live(redis_url: str) -> set[str]:
    async def read() -> set[str]:
        client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            return await live_requests(client, "acme")
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_max_queued_set_later_counts_the_running_the_ready_and_the_waiting_behind_them(
        auth_stack: Stack, redis_url: str) -> None:
    base = auth_stack.base_url
    acme = tenant_key(base)
    # six sessions: four run (the worker's 4 slots), two are ready; two more wait behind a running head
    ids = [submit(base, f"s{n}", acme)[1] for n in range(6)] + [submit(base, "s0", acme)[1] for _ in range(2)]
    wait_for(lambda: sum(call("GET", f"{base}/v1/requests/{rid}", headers=acme)[1]["status"] == "running"
                         for rid in ids) == 4, what="four running")
    assert live(redis_url) == set(ids)
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_queued": 8}, headers=ADMIN)[0] == 200
    assert submit(base, "more", acme)[0] == 429
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_queued": 9}, headers=ADMIN)[0] == 200
    assert [submit(base, f"more{n}", acme)[0] for n in range(2)] == [202, 429]


def test_requests_admitted_as_unlimited_by_a_lagging_process_count_from_the_first_full_check(
        redis_url: str, r: redis.Redis) -> None:
    settings = fast_settings(redis_url, auth=True, admin_key="admin-secret")
    here = Stack(settings).start(workers=0)
    lagging = Stack(settings).start(scheduler=False, workers=0)  # another API process
    try:
        acme = tenant_key(here.base_url)
        assert submit(lagging.base_url, "early", acme)[0] == 202  # it caches acme's limits: none (for 3 s)
        assert call("PUT", f"{here.base_url}/v1/admin/tenants/acme", {"max_queued": 3}, headers=ADMIN)[0] == 200
        assert r.zcard(keys.tenant_active("acme")) == 1  # the request it had, counted
        # within its cache's 3 s the other process still admits as if unlimited
        assert [submit(lagging.base_url, f"late{n}", acme)[0] for n in range(4)] == [202] * 4
        # the set knows 1 of the 5: it admits up to the limit, then its first check finds the other 4
        replies = [submit(here.base_url, f"here{n}", acme) for n in range(3)]
        assert [code for code, _ in replies] == [202, 202, 429], replies
        assert r.zcard(keys.tenant_active("acme")) == 7
        # one ends: 6 are still live, over the limit of 3, so the next check frees a place but refuses
        assert call("DELETE", f"{here.base_url}/v1/requests/{replies[0][1]}", headers=acme)[0] == 200
        time.sleep(RECHECK_SECONDS + 0.1)
        assert submit(here.base_url, "again", acme)[0] == 429
        assert r.zcard(keys.tenant_active("acme")) == 6
    finally:
        lagging.stop()
        here.stop()
