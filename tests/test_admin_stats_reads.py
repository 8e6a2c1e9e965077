"""`GET /v1/admin/stats` (the dashboard reads it every second, `/v1/models` its workers) reads and writes
nothing: a worker that lapsed and rejoins while a stats call runs stays registered (the call used to delete
its entry a round trip after it saw the lapse, and a worker that had rejoined in between served on unseen
for good: no models, 0 workers in the metrics); and a group's token bucket is shown at its level now, as
the scheduler reckons it, not as it stood at the last dispatch."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from tests.helpers import ON_CLUSTER, Stack, call


class RejoinsBeforeTheReply:
    """A real client whose reply to the first EXISTS of `key` that finds it gone reaches the caller only once
    the worker has rejoined (its heartbeat registers it again): the interleaving a busy host gives."""

    def __init__(self, client: Any, key: str) -> None:
        self.client, self.key = client, key

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    async def exists(self, *names: str) -> int:
        found = await self.client.exists(*names)
        if not found and names == (self.key,):
            deadline = time.monotonic() + 10
            while not await self.client.exists(self.key):
                assert time.monotonic() < deadline, "the worker did not rejoin"
                await asyncio.sleep(0.01)
        return found


def test_a_worker_that_rejoins_during_a_stats_read_stays_registered(stack: Stack, r: redis.Redis) -> None:
    worker_id = next(iter(stack.workers))
    alive, registry = keys.worker("default", worker_id), keys.group_key("default", "workers")
    assert [w["worker_id"] for w in call("GET", f"{stack.base_url}/v1/admin/stats")[1]["workers"]] == [worker_id]
    r.delete(alive)  # the worker lapsed (a pause past its lease, a failover): its next heartbeat rejoins

    async def read_stats() -> list[dict[str, Any]]:
        client = async_client(stack.settings.redis_url, cluster=ON_CLUSTER)
        try:
            return await Tuning(RejoinsBeforeTheReply(client, alive)).workers()
        finally:
            await client.aclose()

    assert asyncio.run(read_stats()) == []  # it had lapsed when the call looked
    assert r.exists(alive) and r.hexists(registry, worker_id)  # rejoined, and still registered
    time.sleep(1.0)  # heartbeats go on: a worker live on the roster never registers again by itself
    assert [w["worker_id"] for w in call("GET", f"{stack.base_url}/v1/admin/stats")[1]["workers"]] == [worker_id]
    assert [m["id"] for m in call("GET", f"{stack.base_url}/v1/models")[1]["data"]] != []


def test_the_token_bucket_is_shown_at_its_level_now(stack: Stack, r: redis.Redis) -> None:
    base = stack.base_url
    assert call("PUT", f"{base}/v1/admin/groups/default", {"tokens_per_second": 100, "burst_tokens": 1000})[0] == 200
    state = call("GET", f"{base}/v1/admin/stats")[1]["groups"][0]
    assert state["token_bucket_level"] == 1000  # nothing taken yet: a full bucket
    drained_at = int(time.time() * 1000) - 5000  # drained to 0 five seconds ago: 500 back since
    r.hset(keys.group_key("default", "qs"), mapping={"lvl": 0, "at": drained_at})
    level = call("GET", f"{base}/v1/admin/stats")[1]["groups"][0]["token_bucket_level"]
    assert 500 <= level < 600, level  # was 0.0: the level at the last dispatch
    r.hset(keys.group_key("default", "qs"), mapping={"lvl": 0, "at": drained_at - 60_000})
    assert call("GET", f"{base}/v1/admin/stats")[1]["groups"][0]["token_bucket_level"] == 1000  # never past the cap
