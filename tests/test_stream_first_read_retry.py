"""A stream whose response has started waits out a store that cannot answer for a moment (a long script:
BUSY; a restart still loading: LOADING; a pool at its bound) in its first log reads too, as its live
rereads did: it pings every `idle_seconds` meanwhile, reads again from where its last batch left it, and
delivers every event once. The old code ended the stream at the error of any read before it went live:
a session stream's first read (after its join), an opened stream's read after a full first page, an
ended request's read after the batch `exhausted` kept; a browser's EventSource then reconnected into the
same store error and stopped at its 503. A request stream not opened (a chat's, read before it answers)
still raises: its caller answers the stored request's 503.

Real Valkey (one server or the cluster's master of the session), made busy by a real script.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from sluicegate.sessions import keys
from sluicegate.sessions.connect import store_unavailable
from sluicegate.sessions.events import Event
from sluicegate.sessions.hub import EventHub
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.store import SessionStore
from sluicegate.sessions.stream import FIRST_PAGE, EventStream
from tests.helpers import ON_CLUSTER

PING = 0.3  # idle_seconds: a ping is due well within the store's busy spell
BUSY_SECONDS = 1.5
BUSY = ("local t = redis.call('TIME') local stop = t[1] * 1e6 + t[2] + ARGV[1] * 1e6 "
        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= stop return 1")


def node_client(redis_url: str, key: str) -> redis.Redis:
    """A client on the server that holds `key` (the cluster's master of its slot)."""
    if not ON_CLUSTER:
        return redis.Redis.from_url(redis_url)
    cluster = RedisCluster.from_url(redis_url)
    try:
        node = cluster.get_node_from_key(key)
    finally:
        cluster.close()
    return redis.Redis(host=node.host, port=int(node.port), password=urlsplit(redis_url).password)


class BusyStore:
    """The server of a session's log runs a script for BUSY_SECONDS, answering BUSY to the others meanwhile."""

    def __init__(self, redis_url: str, sid: str) -> None:
        self.redis_url, self.key = redis_url, keys.session_log(sid)
        self.runner: threading.Thread | None = None

    def start(self) -> None:
        """Returns once the server answers BUSY."""
        node = node_client(self.redis_url, self.key)
        node.config_set("busy-reply-threshold", 100)

        def run() -> None:
            spinner = node_client(self.redis_url, self.key)
            try:
                spinner.eval(BUSY, 0, BUSY_SECONDS)
            finally:
                spinner.close()

        self.runner = threading.Thread(target=run, daemon=True)
        self.runner.start()
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.02)
                try:
                    node.get(self.key)
                except redis.exceptions.ResponseError as error:
                    if str(error).startswith("BUSY"):
                        return
            raise AssertionError("the server never answered BUSY")
        finally:
            node.close()

    @property
    def busy(self) -> bool:
        return self.runner is not None and self.runner.is_alive()

    def stop(self) -> None:
        """Waits for the script's end; the threshold back to its default."""
        if self.runner is not None:
            self.runner.join(10)
        node = node_client(self.redis_url, self.key)
        try:
            node.config_set("busy-reply-threshold", 5000)
        finally:
            node.close()


def async_client(redis_url: str) -> Any:
    return AsyncRedisCluster.from_url(redis_url) if ON_CLUSTER else aioredis.Redis.from_url(redis_url)


async def submit(store: SessionStore, sid: str) -> str:
    """A request on the session: its `queued` event is appended to the log and published."""
    new = NewRequest(session_id=sid, max_tokens=2, priority=5, tenant="t", group="default", prompt="p")
    result = await store.submit(new)
    assert result.outcome == "ok", result
    return new.request_id


async def next_batch(batches: AsyncIterator[list[Event]]) -> list[Event]:
    try:
        return await asyncio.wait_for(anext(batches), 15)
    except StopAsyncIteration:
        raise AssertionError("the stream ended") from None
    except Exception as error:
        if store_unavailable(error):
            raise AssertionError(f"the stream ended at the store's error: {error!r}") from error
        raise


async def through_the_busy_spell(busy: BusyStore, batches: AsyncIterator[list[Event]],
                                 until: int) -> tuple[list[list[Event]], int]:
    """The batches up to the one holding event `until`; returns them and how many pings went out while
    the store was still busy."""
    got: list[list[Event]] = []
    pings_while_busy = 0
    while not any(event.seq >= until for batch in got for event in batch):
        batch = await next_batch(batches)
        if not batch and busy.busy:
            pings_while_busy += 1
        got.append(batch)
    return got, pings_while_busy


def seqs(batches: list[list[Event]]) -> list[int]:
    return [event.seq for batch in batches for event in batch]


class Scene:
    """A store and a hub on the test's server, torn down with whatever stream the test opened."""

    def __init__(self, redis_url: str) -> None:
        self.client = async_client(redis_url)
        self.store = SessionStore(self.client, session_ttl=60, lease_seconds=5, cluster=ON_CLUSTER)
        self.hub = EventHub(redis_url, cluster=ON_CLUSTER)

    async def close(self, *streams: tuple[EventStream, AsyncGenerator[list[Event], None]]) -> None:
        for stream, batches in streams:
            await batches.aclose()
            stream.close()
        await self.hub.stop()
        await self.client.aclose()


def run(redis_url: str, sid: str, scenario: Any) -> None:
    busy = BusyStore(redis_url, sid)
    try:
        asyncio.run(scenario(busy))
    finally:
        busy.stop()


def test_a_session_streams_first_log_read_waits_out_a_busy_store(redis_url: str) -> None:
    """The join path (api/streaming.py's session stream): the route answered, then the stream joins and
    reads the log. The old code raised the BUSY error: the response ended with none of the events."""
    sid = "first-read-session"

    async def scenario(busy: BusyStore) -> None:
        scene = Scene(redis_url)
        await scene.hub.start()
        for _ in range(3):
            await submit(scene.store, sid)  # ids 1..3
        other = await scene.hub.join(sid)  # the channel confirmed: the stream's own join returns at once
        stream = EventStream(scene.store, scene.hub, sid, idle_seconds=PING)
        batches = stream.batches()
        try:
            await asyncio.to_thread(busy.start)
            got, pings = await through_the_busy_spell(busy, batches, until=3)
            assert pings >= 1, "no ping while the store was busy"
            await submit(scene.store, sid)  # id 4: live
            while 4 not in seqs(got):
                got.append(await next_batch(batches))
            assert seqs(got) == [1, 2, 3, 4]  # each once, none missing
        finally:
            scene.hub.leave(sid, other)
            await asyncio.to_thread(busy.stop)
            await scene.close((stream, batches))

    run(redis_url, sid, scenario)


def test_an_opened_streams_read_after_a_full_first_page_waits_out_a_busy_store(redis_url: str) -> None:
    """The `_first` path: `open` read a full first page before the answer; the next page, read in the
    response, meets the busy store. The old code sent the first page, then ended the response."""
    sid = "first-read-opened"
    total = FIRST_PAGE + 4

    async def scenario(busy: BusyStore) -> None:
        scene = Scene(redis_url)
        await scene.hub.start()
        for _ in range(total):
            await submit(scene.store, sid)
        stream = EventStream(scene.store, scene.hub, sid, idle_seconds=PING)
        await stream.open()
        batches = stream.batches()
        try:
            await asyncio.to_thread(busy.start)
            got, pings = await through_the_busy_spell(busy, batches, until=total)
            assert seqs(got[:1]) == list(range(1, FIRST_PAGE + 1))  # the page `open` read: no read to fail
            assert pings >= 1, "no ping while the store was busy"
            await submit(scene.store, sid)  # live
            while total + 1 not in seqs(got):
                got.append(await next_batch(batches))
            assert seqs(got) == list(range(1, total + 2))
        finally:
            await asyncio.to_thread(busy.stop)
            await scene.close((stream, batches))

    run(redis_url, sid, scenario)


def test_an_ended_requests_read_after_its_kept_batch_waits_out_a_busy_store(redis_url: str) -> None:
    """The `_ahead` path (a resumed stream of an ended request, api/streaming.py): `exhausted` kept its
    first batch before the answer; the read after it meets the busy store. The old code sent the request's
    `queued`, then ended without its terminal event."""
    sid = "first-read-ended"

    async def scenario(busy: BusyStore) -> None:
        scene = Scene(redis_url)
        await scene.hub.start()
        mine = await submit(scene.store, sid)  # id 1
        for _ in range(FIRST_PAGE + 4):
            await submit(scene.store, sid)  # others': the first page holds only the request's `queued`
        assert await scene.store.cancel(mine) == ["cancelled"]  # its terminal event, past the first page
        stream = EventStream(scene.store, scene.hub, sid, request_id=mine, request_status="cancelled",
                             idle_seconds=PING)
        await stream.open()
        assert stream.reader is None and not await stream.exhausted()
        batches = stream.batches()
        try:
            await asyncio.to_thread(busy.start)
            got, pings = await through_the_busy_spell(busy, batches, until=FIRST_PAGE + 6)
            assert [event.name for batch in got for event in batch] == ["queued", "cancelled"]
            assert pings >= 1, "no ping while the store was busy"
            assert stream.finished
        finally:
            await asyncio.to_thread(busy.stop)
            await scene.close((stream, batches))

    run(redis_url, sid, scenario)


def test_a_request_stream_read_before_its_answer_still_raises(redis_url: str) -> None:
    """A request stream not opened (a chat's: api/openai_routes.py reads its first batches before it
    answers) raises the store's error at its first read, for the caller's 503 that names the stored
    request; it does not wait, unanswered, for the store."""
    sid = "first-read-chat"

    async def scenario(busy: BusyStore) -> None:
        scene = Scene(redis_url)
        await scene.hub.start()
        mine = await submit(scene.store, sid)
        other = await scene.hub.join(sid)
        stream = EventStream(scene.store, scene.hub, sid, request_id=mine, request_status="queued",
                             idle_seconds=PING)
        batches = stream.batches()
        try:
            await asyncio.to_thread(busy.start)
            with pytest.raises(redis.exceptions.ResponseError, match="^BUSY"):
                await asyncio.wait_for(anext(batches), 5)
        finally:
            scene.hub.leave(sid, other)
            await asyncio.to_thread(busy.stop)
            await scene.close((stream, batches))

    run(redis_url, sid, scenario)


def test_a_started_streams_read_that_fails_otherwise_still_raises(redis_url: str) -> None:
    """Only a store that cannot answer for now is waited for: any other error of a read ends the stream.
    The store's own read is wrapped only to fail once as a bug would."""
    sid = "first-read-bug"

    async def scenario() -> None:
        scene = Scene(redis_url)
        await scene.hub.start()
        for _ in range(FIRST_PAGE + 1):
            await submit(scene.store, sid)
        stream = EventStream(scene.store, scene.hub, sid, idle_seconds=PING)
        await stream.open()

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise ValueError("not a store error")

        scene.store.read_page = broken  # type: ignore[method-assign]
        batches = stream.batches()
        try:
            assert len(await next_batch(batches)) == FIRST_PAGE
            with pytest.raises(ValueError, match="not a store error"):
                await asyncio.wait_for(anext(batches), 5)
        finally:
            await scene.close((stream, batches))

    asyncio.run(scenario())
