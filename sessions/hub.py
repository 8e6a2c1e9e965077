"""One Redis sharded pub/sub connection per process (per master on a cluster), fanned out to every
local reader of a session.

Ten thousand open streams must not mean ten thousand Redis connections: each API process holds one
subscriber connection (sessions/subscriber.py), subscribes a session's channel while it has local
readers (and a short while after, so that reconnecting clients do not churn subscriptions), and copies each published
batch into the readers' queues. The log in Redis stays the source of truth: a reader whose queue
overflows, or that sees a gap in ids, reads the log again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sluicegate.sessions import keys
from sluicegate.sessions.events import Event, parse_published
from sluicegate.sessions.subscriber import Subscriber

log = logging.getLogger(__name__)

# How long `join` waits for the server to confirm a subscription before it returns the reader anyway.
# Shorter than api/deadline.py's RESPONSE_DEADLINE_SECONDS (5 s): a request stream joins before its
# response starts, so a wait as long as the deadline would always end in its 503 instead.
CONFIRM_TIMEOUT_SECONDS = 4.0
# Log reads of readers sent back to the log at once (every reader of a channel resubscribed after a lost
# connection): at most this many at a time per process, well inside a cluster client's bound of
# connections per master (256, past which it raises): thousands of streams reread in turn, none cut.
REREADS_AT_ONCE = 32


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

    def drain(self) -> None:
        """Empty the queue and clear `overflowed`, just before a log read is sent: all of it was published
        before that read, so the read covers it, and a batch left behind at or below the reader's cursor
        would send it to the log once more for nothing."""
        self.overflowed = False
        queue = self.queue
        while not queue.empty():
            queue.get_nowait()


class _Channel:
    def __init__(self) -> None:
        self.readers: set[Reader] = set()
        self.confirmed = asyncio.Event()
        self.idle_since: float | None = None
        # Readers `join` returned before the first confirmation (it gave up waiting): what was published
        # between their log read and the subscription is only in the log, so that confirmation rereads them.
        self.unconfirmed: set[Reader] = set()


class EventHub:
    """Fan-out of session channels to local readers over a single subscriber connection."""

    def __init__(self, redis_url: str, *, cluster: bool = False, linger_seconds: float = 5.0,
                 reader_queue: int = 4096, confirm_timeout: float = CONFIRM_TIMEOUT_SECONDS,
                 client_name: str | None = None) -> None:
        """`cluster`: `redis_url` names a node of a Redis Cluster (one connection per master then);
        `client_name` names its connections in CLIENT LIST."""
        self._subscriber = Subscriber(redis_url, self._on_frame, cluster=cluster, client_name=client_name)
        self._channels: dict[str, _Channel] = {}
        self._linger = linger_seconds
        self._reader_queue = reader_queue
        self._confirm_timeout = confirm_timeout
        self._linger_task: asyncio.Task[None] | None = None
        self.rereads = asyncio.Semaphore(REREADS_AT_ONCE)  # taken by a live stream's log read (sessions/stream.py)

    async def start(self) -> None:
        await self._subscriber.start()
        self._linger_task = asyncio.create_task(self._linger_loop())

    async def stop(self) -> None:
        if self._linger_task is not None:
            self._linger_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._linger_task
        await self._subscriber.stop()

    @property
    def subscribed_sessions(self) -> int:
        return len(self._channels)

    async def join(self, sid: str) -> Reader:
        """Add a reader for a session; returns once the subscription is live on the server.

        If the server does not confirm in time (it is down or restarting) the reader is returned
        anyway: it reads the log whenever it has been idle, so it still gets everything. Cancelled
        meanwhile (the client left, the response deadline fired), it leaves again: no caller has the
        reader to leave with, and the channel would stay subscribed and its queue fill for good.
        """
        name = keys.session_channel(sid)
        reader = Reader(self._reader_queue)
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel()
        channel.readers.add(reader)  # before subscribing: if that raises, leaving idles the channel (it lingers out)
        channel.idle_since = None
        try:
            self._subscriber.subscribe(name)  # (a no-op when already wanted)
            if not channel.confirmed.is_set():
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that lands once
                    # the wait is done, and the cancelled caller would go on with a reader nobody leaves with
                    async with asyncio.timeout(self._confirm_timeout):
                        await channel.confirmed.wait()
                except TimeoutError:
                    if not channel.confirmed.is_set():
                        channel.unconfirmed.add(reader)  # returned anyway (above); reread at the confirmation
        except BaseException:
            self.leave(sid, reader)
            raise
        return reader

    def join_live(self, sid: str) -> Reader | None:
        """A reader for a session whose channel this process is already subscribed to (confirmed by the
        server), at once; None when it is not (`join` subscribes and waits). A reader taken before a
        call that writes the session's events gets every one of them live, so its stream needs no log
        read: a session's next request (a client that names its session) pays for none. Whatever it
        misses (a lost connection, a full queue) sends it to the log, as any reader."""
        channel = self._channels.get(keys.session_channel(sid))
        if channel is None or not channel.confirmed.is_set():
            return None
        reader = Reader(self._reader_queue)
        channel.readers.add(reader)
        channel.idle_since = None
        return reader

    def leave(self, sid: str, reader: Reader) -> None:
        channel = self._channels.get(keys.session_channel(sid))
        if channel is not None:
            channel.readers.discard(reader)
            channel.unconfirmed.discard(reader)
            if not channel.readers:
                channel.idle_since = time.monotonic()

    def _on_frame(self, kind: bytes, channel_name: bytes, payload: bytes | None) -> None:
        channel = self._channels.get(channel_name.decode())
        if channel is None:
            return
        if kind == b"smessage" and payload is not None:
            batch = parse_published(payload)
            for reader in channel.readers:
                reader.offer(batch)
        elif kind == b"ssubscribe":
            # Resubscribed after a lost connection or on a slot's new master: what was published meanwhile
            # is only in the log, so every reader rereads it. A first confirmation: only the readers `join`
            # gave up waiting for it (they read the log before the subscription was live).
            for reader in channel.readers if channel.confirmed.is_set() else channel.unconfirmed:
                reader.reread()
            channel.unconfirmed.clear()
            channel.confirmed.set()

    async def _linger_loop(self) -> None:
        """Drops channels without readers for `linger` seconds. It must outlive any error of one pass: it alone
        gives subscriptions back, and a dead loop would keep every channel ever streamed subscribed."""
        while True:
            await asyncio.sleep(self._linger / 2)
            try:
                self._drop_lingering()
            except Exception:
                log.exception("event hub: dropping lingering channels failed; trying again at the next pass")

    def _drop_lingering(self) -> None:
        cutoff = time.monotonic() - self._linger
        stale = [n for n, c in self._channels.items() if not c.readers and c.idle_since and c.idle_since < cutoff]
        self._subscriber.unsubscribe(*stale)  # first: should it raise, the channels stay for the next pass
        for name in stale:
            del self._channels[name]
