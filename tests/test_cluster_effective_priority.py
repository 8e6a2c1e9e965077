"""A request aged to class 10 shows effective_priority 10 (GET /v1/requests/{rid}, sessions/status.py) on a
cluster as on one server: the cluster sweep, which may touch only its group's slot, hands the new class to
the scheduler that swept (the group's epw), and that scheduler writes it on the request's data plane."""

from __future__ import annotations

import asyncio
import time

import redis

from sluicegate.scheduler.loop import Scheduler
from sluicegate.sessions import keys
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.status import request_view
from sluicegate.sessions.transitions import Transitions
from tests.helpers import fast_settings
from tests.sched_harness import Harness

G = "default"


def sweep_as_a_cluster_scheduler(redis_url: str) -> None:
    """One sweep of the group by the scheduler loop's own code (Scheduler.sweep_once), on the cluster's
    scripts: on one server too, as the harness runs them (both planes' keys then live on that server)."""

    async def sweep() -> None:
        scheduler = Scheduler(fast_settings(redis_url))
        scheduler.cluster = True
        scheduler.transitions = Transitions(Scripts(scheduler.redis, single_server=False), lease_ms=60_000,
                                            session_ttl=3600)
        try:
            await scheduler.sweep_once(G)
        finally:
            await scheduler.redis.aclose()

    asyncio.run(sweep())


def test_an_aged_request_shows_effective_priority_10_on_a_cluster(r: redis.Redis, redis_url: str) -> None:
    h = Harness(r, cluster=True)
    h.policy(mw2=1)  # class 2 ages after 1 s
    h.add_worker("w", slots=1)
    busy = h.submit("busy", priority=9)
    low = h.submit("low", priority=2)
    gone = h.submit("gone", priority=2)
    h.submit("h0", priority=9)
    time.sleep(1.1)
    r.delete(keys.request(gone))  # as if its hash had expired: the write must not bring it back
    sweep_as_a_cluster_scheduler(redis_url)
    assert h.req(low)["ep"] == "10" and h.req(low)["p"] == "2"
    assert request_view(low, h.req(low))["effective_priority"] == 10
    assert r.exists(keys.request(gone)) == 0
    assert r.llen(keys.group_key(G, "epw")) == 0  # every entry taken
    h.complete(busy)
    assert h.running() == [low] and h.req(low)["ep"] == "10"
