"""A group held back by its max_concurrency cap is shown throttled by the cap, not by the last reason the
quota gate wrote: with no rate quota and no free ticket the dispatch never reaches the gate (the only writer
of the reason), so a requests/s quota removed long ago was still named (`last_throttle_reason`, shown by the
dashboard and `sluicegate stats`), sending the operator to a knob that no longer exists."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis

from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness

T = TypeVar("T")


def admin(redis_url: str, use: Callable[[Tuning], Awaitable[T]]) -> T:
    """One call of the admin code (scheduler.admin.Tuning), on one server or a cluster."""

    async def run() -> T:
        client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            return await use(Tuning(client))
        finally:
            await client.aclose()

    return asyncio.run(run())


def group_state(redis_url: str, group: str = "default") -> dict[str, Any]:
    """The group's entry in GET /v1/admin/stats."""
    return admin(redis_url, lambda tuning: tuning.group_state(group))


def set_quota(redis_url: str, **fields: float | None) -> None:
    """PUT /v1/admin/groups/default's quota path (Harness.quota reads a single server's connection pool)."""
    admin(redis_url, lambda tuning: tuning.set_quota("default", fields))


def test_a_capped_group_is_throttled_by_the_cap_not_by_a_removed_quota(r: redis.Redis, redis_url: str) -> None:
    """The reviewer's repro: a requests/s throttle, the quota removed and a cap of 2 set, then 4 requests on
    a worker of 2 slots: 2 run, 2 wait for the cap."""
    h = Harness(r, cluster=ON_CLUSTER)
    # one request per 100 s: the second waits on any clock (on a cluster the servers' own)
    set_quota(redis_url, requests_per_second=0.01, burst=1)
    h.add_worker("w", slots=2)
    first = h.submit("a")
    h.submit("b")
    assert h.running() == [first]
    state = group_state(redis_url)
    assert state["throttled"] and state["last_throttle_reason"] == "requests_per_second"
    assert state["next_admission_ms"] is not None
    set_quota(redis_url, requests_per_second=None, burst=None, max_concurrency=2)
    h.sweep()  # forgets the rate quota's wake-up; the waiting request starts
    assert len(h.running()) == 2
    queued = [h.submit(f"q{i}") for i in range(2)]
    assert len(h.running()) == 2 and {h.status(rid) for rid in queued} == {"queued"}
    assert r.hget(keys.group_key("default", "qs"), "throttled") == "requests_per_second"  # the gate's, stale
    state = group_state(redis_url)
    assert state["quota"] == {"max_concurrency": 2} and state["next_admission_ms"] is None
    assert state["throttled"] and state["last_throttle_reason"] == "max_concurrency"
    h.complete(first)  # one waiting request starts in its place: the other still waits for the cap
    state = group_state(redis_url)
    assert len(h.running()) == 2 and state["throttled"] and state["last_throttle_reason"] == "max_concurrency"


def test_a_pending_rate_quota_wake_up_keeps_its_own_reason_under_a_cap(r: redis.Redis, redis_url: str) -> None:
    """Both hold work back: the rate quota's wake-up is the next admission shown, and its reason stays."""
    h = Harness(r, cluster=ON_CLUSTER)
    set_quota(redis_url, requests_per_second=0.01, burst=1, max_concurrency=1)
    h.add_worker("w", slots=2)
    first = h.submit("a")
    h.submit("b")
    assert h.running() == [first]
    state = group_state(redis_url)
    assert state["throttled"] and state["next_admission_ms"] is not None  # the gate asks the rate first
    assert state["last_throttle_reason"] == "requests_per_second"
