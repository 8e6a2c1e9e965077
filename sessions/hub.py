"""One Redis pubsub connection per process, fanned out to every local reader of a session.

Ten thousand open streams must not mean ten thousand Redis connections: each API process holds one
subscriber connection, subscribes a session's channel while it has local readers (and a short
while after, so that reconnecting clients do not churn subscriptions), and copies each published
batch into the readers' queues. The log in Redis stays the source of truth: a reader whose queue
overflows, or that sees a gap in ids, reads the log again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from sessions import keys
from sessions.events import Event, parse_published

log = logging.getLogger(__name__)

HUB_CHANNEL = keys.PREFIX + "hub"  # subscribed for the process lifetime so the reader always has a channel


class Reader:
    """A local reader's queue of published batches; `overflowed` tells it to reread the log."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue(maxsize)
        self.overflowed = False

    def offer(self, batch: list[Event]) -> None:
        try:
            self.queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.overflowed = True

    def reread(self) -> None:
        """Wake the reader and send it back to the log (events may have been published unseen)."""
        self.overflowed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait([])


class _Channel:
    def __init__(self) -> None:
        self.readers: set[Reader] = set()
        self.confirmed = asyncio.Event()
        self.idle_since: float | None = None


class EventHub:
    """Fan-out of session channels to local readers over a single pubsub connection."""

    def __init__(self, redis: Redis, *, linger_seconds: float = 5.0, reader_queue: int = 4096) -> None:
        self._redis = redis
        self._pubsub: PubSub | None = None
        self._channels: dict[str, _Channel] = {}
        self._lock = asyncio.Lock()
        self._linger = linger_seconds
        self._reader_queue = reader_queue
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._pubsub = self._redis.pubsub()
        await self._pubsub.subscribe(HUB_CHANNEL)
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._linger_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()

    @property
    def subscribed_sessions(self) -> int:
        return len(self._channels)

    async def join(self, sid: str) -> Reader:
        """Add a reader for a session; returns once the subscription is live on the server."""
        assert self._pubsub is not None, "EventHub.start() first"
        channel_name = keys.session_channel(sid)
        reader = Reader(self._reader_queue)
        async with self._lock:
            channel = self._channels.get(channel_name)
            if channel is None:
                channel = self._channels[channel_name] = _Channel()
                await self._pubsub.subscribe(channel_name)
            channel.readers.add(reader)
            channel.idle_since = None
        await channel.confirmed.wait()
        return reader

    def leave(self, sid: str, reader: Reader) -> None:
        channel = self._channels.get(keys.session_channel(sid))
        if channel is not None:
            channel.readers.discard(reader)
            if not channel.readers:
                channel.idle_since = time.monotonic()

    async def _read_loop(self) -> None:
        assert self._pubsub is not None
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # connection trouble: readers fall back to the log on gaps
                log.exception("event hub lost its pubsub connection; retrying")
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            name = message["channel"].decode()
            channel = self._channels.get(name)
            if channel is None:
                continue
            kind = message["type"]
            if kind == "subscribe":
                if channel.confirmed.is_set():
                    # Resubscribed after a lost connection (redis-py does it on reconnect): what was
                    # published while we were away is only in the log, so readers reread it.
                    for reader in channel.readers:
                        reader.reread()
                channel.confirmed.set()
            elif kind == "message":
                batch = parse_published(message["data"])
                for reader in channel.readers:
                    reader.offer(batch)

    async def _linger_loop(self) -> None:
        assert self._pubsub is not None
        while True:
            await asyncio.sleep(self._linger / 2)
            cutoff = time.monotonic() - self._linger
            async with self._lock:
                stale = [n for n, c in self._channels.items() if not c.readers and c.idle_since
                         and c.idle_since < cutoff]
                for name in stale:
                    del self._channels[name]
                if stale:
                    await self._pubsub.unsubscribe(*stale)
