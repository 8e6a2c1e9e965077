"""A session stream of any principal (auth off, the admin key: no `owner`) goes to the log when a live batch
is at or below its cursor, as a tenant's stream did: after the session's TTL its id may start a new life
whose ids begin at 1 again on the same channel. Dropped as "already sent", that life's events were lost
silently: the stream stayed open behind them, then delivered its events past the old cursor as if the
old life went on. And it stays cheap: the reader's queue is emptied just before each log read, which
covers all of it, so a queue of batches already read sends no stream to the log once per batch.

Real Valkey; the store's own read is wrapped only to count the reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from sluicegate.sessions import keys
from sluicegate.sessions.hub import EventHub
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.store import SessionStore
from sluicegate.sessions.stream import EventStream
from tests.helpers import ON_CLUSTER, until


def async_client(redis_url: str) -> Any:
    return AsyncRedisCluster.from_url(redis_url) if ON_CLUSTER else aioredis.Redis.from_url(redis_url)


async def submit(store: SessionStore, sid: str, tenant: str = "t") -> str:
    """A request on the session: its `queued` event is appended to the log and published."""
    new = NewRequest(session_id=sid, max_tokens=2, priority=5, tenant=tenant, group="default", prompt="p")
    result = await store.submit(new)
    assert result.outcome == "ok", result
    return new.request_id


async def close_all(pending: asyncio.Future[Any] | None, batches: Any, hub: EventHub, client: Any) -> None:
    """A scenario's teardown: the read still waiting, the stream, the hub, the client."""
    if pending is not None and not pending.done():
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
    await batches.aclose()
    await hub.stop()
    await client.aclose()


def test_a_session_stream_without_an_owner_ends_at_a_recycled_sessions_first_event(redis_url: str) -> None:
    sid = "recycled-unowned"

    async def scenario() -> None:
        client = async_client(redis_url)
        store = SessionStore(client, session_ttl=1, lease_seconds=5, cluster=ON_CLUSTER)
        hub = EventHub(redis_url, cluster=ON_CLUSTER)
        await hub.start()
        stream = EventStream(store, hub, sid, idle_seconds=30.0)  # auth off or the admin key: no owner
        batches = stream.batches()
        pending: asyncio.Future[Any] | None = None
        try:
            # The first life: three requests, each cancelled (queued, cancelled): ids 1..6.
            for _ in range(3):
                assert await store.cancel(await submit(store, sid)) == ["cancelled"]
            sent: list[int] = []
            while len(sent) < 6:
                sent += [e.seq for e in await asyncio.wait_for(anext(batches), 5)]
            assert sent == [1, 2, 3, 4, 5, 6] and stream.cursor == 6

            # Idle, the session expires (its TTL, 1 s); the stream would notice at its next idle read only
            # (30 s). A submit on the id now starts a new life: its `queued` is id 1 on the same channel.
            for _ in range(100):
                if not await client.exists(keys.session_meta(sid), keys.session_log(sid)):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the session did not expire")
            pending = asyncio.ensure_future(anext(batches))
            await submit(store, sid)
            done, _ = await asyncio.wait({pending}, timeout=5)
            assert done, "the stream stayed open behind the new life's events (dropped as already sent)"
            with pytest.raises(StopAsyncIteration):
                pending.result()  # ended, nothing of the new life delivered
            assert stream.expired is not None, "ended without the gap that makes the reconnect a 409"
            assert stream.expired.lost_before == 1  # the log's last id, behind the cursor
        finally:
            await close_all(pending, batches, hub, client)

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize("owner", [None, "t"])
def test_batches_queued_before_a_log_read_send_the_stream_to_the_log_no_more(redis_url: str,
                                                                              owner: str | None) -> None:
    """A reader whose queue overflowed: the log read that follows covers every batch still queued (all
    published before it was sent). Kept, each was at or below the cursor and sent a session stream to
    the log once more, one read per batch (up to the queue's 4,095 after an overflow)."""
    sid = f"drained-{owner}"

    async def scenario() -> None:
        client = async_client(redis_url)
        store = SessionStore(client, session_ttl=60, lease_seconds=5, cluster=ON_CLUSTER)
        hub = EventHub(redis_url, cluster=ON_CLUSTER, reader_queue=4)
        await hub.start()
        reads = 0
        real_read = store.read_page

        async def counted_read(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            return await real_read(*args, **kwargs)

        store.read_page = counted_read  # type: ignore[method-assign]
        await submit(store, sid)  # id 1
        stream = EventStream(store, hub, sid, idle_seconds=30.0, owner=owner)
        batches = stream.batches()
        pending: asyncio.Future[Any] | None = None
        try:
            assert [e.seq for e in await asyncio.wait_for(anext(batches), 5)] == [1]  # joined, then the log
            assert reads == 1
            reader = stream.reader
            assert reader is not None
            for _ in range(5):  # ids 2..6, while the client is slow: four queued, the fifth overflows
                await submit(store, sid)
            await until(lambda: reader.overflowed, "the overflow")
            assert reader.queue.qsize() == 4

            assert [e.seq for e in await asyncio.wait_for(anext(batches), 5)] == [2, 3, 4, 5, 6]  # from the log
            assert reads == 2
            pending = asyncio.ensure_future(anext(batches))
            await submit(store, sid)  # id 7, live
            assert [e.seq for e in await asyncio.wait_for(pending, 5)] == [7]
            assert reads == 2, f"{reads - 2} more log reads for batches the overflow's read had covered"
        finally:
            await close_all(pending, batches, hub, client)

    asyncio.run(asyncio.wait_for(scenario(), 30))
