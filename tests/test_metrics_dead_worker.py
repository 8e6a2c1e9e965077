"""Free slots are the live workers' only: a worker killed while idle leaves its tickets in the group's idle
list until a dispatch pops them or a live worker of the group heartbeats (heartbeat.lua reaps it), and
`sluicegate_free_slots` and `free_slots` in `/v1/admin/stats` counted them: a group whose last worker died
showed 8 free slots, 0 workers and 0 slots, the capacity signal read as spare capacity right after its loss."""

from __future__ import annotations

import asyncio

import redis

from sluicegate.api.metrics import render_metrics
from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness, tickets


def gauges(redis_url: str, group: str = "default") -> dict[str, float]:
    """The group's workers, slots and free slots in /metrics, and its free slots in /v1/admin/stats."""

    async def read() -> tuple[bytes, int]:
        client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            return (await render_metrics(client, open_streams=0),
                    (await Tuning(client).group_state(group))["free_slots"])
        finally:
            await client.aclose()

    body, free_slots = asyncio.run(read())
    shown = {"stats_free_slots": float(free_slots)}
    for name in ("sluicegate_workers", "sluicegate_worker_slots", "sluicegate_free_slots"):
        line = next(ln for ln in body.decode().splitlines() if ln.startswith(f'{name}{{group="{group}"}}'))
        shown[name] = float(line.split()[-1])
    return shown


def kill(h: Harness, wid: str) -> None:
    """kill -9: the worker neither deregisters nor heartbeats again; its liveness key lapses."""
    h.r.delete(keys.worker(h.workers[wid], wid))


def test_the_tickets_of_a_dead_worker_are_no_free_slots(r: redis.Redis, redis_url: str) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("gone", slots=8)
    h.add_worker("busy", slots=3)
    h.submit("s1")  # one of the live slots runs a request (whichever ticket the dispatch took)
    assert len(h.runs) == 1
    taken = h.runs[0].wid
    assert gauges(redis_url) == {"sluicegate_workers": 2, "sluicegate_worker_slots": 11,
                                 "sluicegate_free_slots": 10, "stats_free_slots": 10}
    kill(h, "gone")
    assert tickets(h) == 10  # its tickets are still listed
    live_free = 2 if taken == "busy" else 3
    assert gauges(redis_url) == {"sluicegate_workers": 1, "sluicegate_worker_slots": 3,
                                 "sluicegate_free_slots": live_free, "stats_free_slots": live_free}
    kill(h, "busy")  # the group's last worker: no capacity at all, whatever the idle list still holds
    assert tickets(h) == 10
    assert gauges(redis_url) == {"sluicegate_workers": 0, "sluicegate_worker_slots": 0,
                                 "sluicegate_free_slots": 0, "stats_free_slots": 0}
