"""Live streams that all go back to the log at once (a resubscribe after a store restart, the same idle
period) take turns: at most REREADS_AT_ONCE of their log reads are in flight, so a thousand streams do
not take a thousand pooled connections (or a cluster pool past its bound) in one moment. Real Valkey;
the store's own read is wrapped only to hold each read open and count how many are open together."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from sluicegate.sessions.hub import REREADS_AT_ONCE, EventHub
from sluicegate.sessions.store import SessionStore
from sluicegate.sessions.stream import EventStream
from tests.helpers import ON_CLUSTER, until

STREAMS = REREADS_AT_ONCE + 8


def test_live_streams_reread_the_log_at_most_rereads_at_once_together(redis_url: str) -> None:
    async def scenario() -> None:
        client: Any = (AsyncRedisCluster.from_url(redis_url) if ON_CLUSTER
                       else aioredis.Redis.from_url(redis_url))
        store = SessionStore(client, session_ttl=60, lease_seconds=5, cluster=ON_CLUSTER)
        hub = EventHub(redis_url, cluster=ON_CLUSTER)
        await hub.start()
        open_reads, most, release = 0, 0, asyncio.Event()
        real_read = store.read_page

        async def held_read(*args: Any, **kwargs: Any) -> Any:
            nonlocal open_reads, most
            open_reads += 1
            most = max(most, open_reads)
            try:
                await release.wait()
                return await real_read(*args, **kwargs)
            finally:
                open_reads -= 1

        streams = [EventStream(store, hub, f"cap-{n}", idle_seconds=0.2) for n in range(STREAMS)]
        for stream in streams:
            await stream.open()  # the first page (not a reread): an empty log
        store.read_page = held_read  # type: ignore[method-assign]
        generators = [stream.batches() for stream in streams]
        pumps = [asyncio.create_task(anext(generator)) for generator in generators]
        try:
            # every stream idles out together and goes back to the log
            await until(lambda: open_reads >= REREADS_AT_ONCE, "the first turn of rereads", timeout=10)
            await asyncio.sleep(0.5)  # time for any stream not held back to start its read too
            assert most == REREADS_AT_ONCE, f"{most} log reads at once"
            release.set()
            await asyncio.wait_for(asyncio.gather(*pumps), 10)  # each gets its ping once its read is served
            assert most == REREADS_AT_ONCE
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for generator in generators:
                await generator.aclose()
            await hub.stop()
            await client.aclose()

    asyncio.run(scenario())
