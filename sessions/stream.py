"""Resumable event streams: the log after a cursor, then live events, none twice, none missing.

The order of operations is what makes resume exact:
1. join the session's channel (live from here on);
   (a request stream first reads the request's status: an ended request's terminal event is already
   in the log, so it is served from the log alone, without joining; a stream given a reader that
   joined before any event after its cursor was written starts at step 3: all of them come live);
2. read the log after the cursor, in pages;
3. take live batches, dropping ids already sent; a gap (or a reader queue overflow) rereads the log.

A session id recycled after its TTL starts its event ids at 1 again on the same channel. A session
stream's live batch that starts at or below its cursor (a new life's first events, or the overlap of a
log read with what was published while it was sent) therefore sends it to the log to look: a new life
still short of the cursor is a gap there (the stream ends, and a reconnect with its last id gets the 409),
and a stream opened for one tenant (`owner`) also ends once the log says the session is another tenant's,
instead of delivering the new owner's events past its cursor. Just before each log read the reader's
queue is emptied (all of it was published before the read, which covers it), so only what is published
while a read is on its way can send a stream to the log again for nothing.

A log read in a response that has started (step 2 in `batches` as well as step 3's rereads) that meets a
store that cannot answer for now waits and reads again from the cursor, pinging meanwhile (`_log`); only
the reads before the answer (`open`, `exhausted`, a chat's first batches) raise, for the caller's 503.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from sluicegate.sessions import keys
from sluicegate.sessions.connect import store_unavailable
from sluicegate.sessions.events import Event
from sluicegate.sessions.hub import EventHub, Reader
from sluicegate.sessions.idle import IdleDeadline
from sluicegate.sessions.store import CursorExpired, LogBounds, SessionStore, log_gap

FIRST_PAGE = 16  # small, so a resume sends its first event without reading (and parsing) the backlog first
PAGE = 1000
LOG_RETRY_SECONDS = 0.5  # a started stream's log read that failed (the store loading, out of connections) is retried


class EventStream:
    """Yields batches of events of one session (optionally one request) after an exclusive cursor."""

    def __init__(self, store: SessionStore, hub: EventHub, session_id: str, *, after: int = 0,
                 request_id: str | None = None, request_status: str | None = None,
                 idle_seconds: float = 15.0, joined: Reader | None = None, owner: str | None = None,
                 first_event: int | None = None) -> None:
        """`request_status`: the request's status if the caller has just read it (saves a read).
        `joined`: a reader of the session's channel that joined before any event after `after` was
        written (EventHub.join_live, before the submit): the stream reads no log unless it misses one.
        `owner`: the tenant the session stream was opened for (None: any; a request stream needs none,
        its request id is its own).
        `first_event`: a request stream's request's own first event id (its `queued`, written before the
        stream was asked for): a log read from before it that finds it lost (a store restarted from an
        older state) or another request's ends the stream, as a session stream ends at a gap (`_backlog`)."""
        self.store = store
        self.hub = hub
        self.session_id = session_id
        self.cursor = after
        self.request_id = request_id
        self.idle_seconds = idle_seconds
        self.finished = False
        self.request_status = request_status
        self.expired: CursorExpired | None = None  # set when the log was trimmed past the cursor (the stream ends)
        self.owner = owner
        self.first_event = first_event
        self.at_cursor: Event | None = None  # the event at the cursor, when `open` was asked to read it too
        self.reader: Reader | None = joined
        self._live_from_start = joined is not None
        self._first: tuple[LogBounds, list[Event]] | None = None  # the first page, read by `open`
        # Whether the caller has answered before `batches` reads the log's backlog, so that those reads wait
        # out a store error (`_log`) instead of raising. A session stream's route answers once it has read
        # the session's state (api/streaming.py), an opened stream's once `open` read the first page; a
        # request stream not opened is read before its caller answers (a chat's first token or whole
        # answer: api/openai_routes.py), which answers a store error itself, with the stored request's 503.
        # (Live rereads, in `_live`, wait in every stream: a chat's starts once it has waited a ping.)
        self._answered = request_id is None
        self._ahead: list[Event] | None = None  # an ended request's first batch, read by `exhausted`

    async def open(self, *, at_cursor: bool = False) -> LogBounds:
        """Steps 1 and 2 before the response starts: join (unless the request ended), read the first page.
        Returns the log's bounds from that same read, so a route checks its cursor without another read.
        Only for a caller that knows the request's status; `close` undoes the join if no stream follows.
        `at_cursor`: for an ended request resumed from a cursor, the page starts at the cursor's own event
        (`at_cursor`, one entry more, dropped by the stream as already sent): the request's own at a
        reconnect after its terminal event, it shows the log is the request's life's (api/streaming.py)."""
        ended = self.request_id is not None and (self.request_status is None
                                                 or self.request_status in keys.TERMINAL_STATUSES)
        if not ended:
            self.reader = await self.hub.join(self.session_id)
        try:
            if at_cursor and ended and self.cursor > 0:
                self._first = await self._read_page(FIRST_PAGE, after=self.cursor - 1)
                events = self._first[1]
                self.at_cursor = events[0] if events and events[0].seq == self.cursor else None
            else:
                self._first = await self._read_page(FIRST_PAGE)
        except BaseException:
            self.close()
            raise
        self._answered = True  # (`exhausted` reads before the answer too: it raises, the route's 503)
        return self._first[0]

    @property
    def first_page(self) -> list[Event]:
        """The events of the first page `open` read (empty before `open`, or once the stream served it)."""
        return self._first[1] if self._first is not None else []

    async def exhausted(self) -> bool:
        """For a resumed stream of an ended request (opened, so not joined): True when the log holds none of
        its events after the cursor (the cursor is at or past its terminal event), so that the route answers
        204, not an empty stream that a browser's EventSource would reconnect to for ever. The first page
        (read by `open`) usually tells; it reads on only while pages hold none of the request's events, the
        pages its stream would read anyway, and keeps the first batch found for the stream."""
        assert self.request_id is not None and self.reader is None, "an ended request's stream, not joined"
        async with aclosing(self._backlog(FIRST_PAGE)) as backlog:
            async for batch in backlog:
                self._ahead = batch
                return False
        return self.expired is None  # (a gap: the stream ends at once, and a reconnect gets the 409)

    def close(self) -> None:
        """Leave the session's channel (idempotent): a response that never ran its body still leaves."""
        if self.reader is not None:
            self.hub.leave(self.session_id, self.reader)
            self.reader = None

    def _keep(self, events: list[Event]) -> list[Event]:
        """Events past the cursor (and of the request, for a request stream), up to its terminal one."""
        kept: list[Event] = []
        for event in events:
            if event.seq <= self.cursor:
                continue
            self.cursor = event.seq
            if self.request_id is None or event.request_id == self.request_id:
                kept.append(event)
                if self.request_id is not None and event.terminal:
                    self.finished = True
                    break
        return kept

    async def _read_page(self, limit: int, after: int | None = None) -> tuple[LogBounds, list[Event]]:
        """The log after the cursor (or `after`). The reader's queue is emptied just before: every batch in
        it was published before this read is sent, so the read covers it (kept, the batches would be at or
        below the cursor, and send a session stream to the log again)."""
        if self.reader is not None:
            self.reader.drain()
        return await self.store.read_page(self.session_id, self.cursor if after is None else after, limit)

    async def _backlog(self, page: int = PAGE, gate: asyncio.Semaphore | None = None) -> AsyncIterator[list[Event]]:
        """The log after the cursor, in growing pages. `gate`: held for each page's read only (not while a
        page is written to a client, however slow)."""
        while not self.finished:
            first, self._first = self._first, None
            if first is not None:  # read by `open`
                bounds, events = first
            elif gate is None:
                bounds, events = await self._read_page(page)
            else:
                async with gate:  # (the queue is emptied once the turn comes, not while waiting for it)
                    bounds, events = await self._read_page(page)
            if self.owner is not None and bounds.owner != self.owner:  # recycled (or expired): not ours
                self.finished = True
                return
            gap = log_gap(bounds, self.cursor)
            if gap is not None:
                # A reader so slow (or a race with the check before the stream) that the log was trimmed
                # past its cursor: end the stream rather than skip events; a reconnect with the last id
                # received gets the 409 that says so.
                self.expired = gap
                self.finished = True
                return
            if self._first_event_lost(bounds, events):
                # A stream given a reader joined before its request's submit reads the log only when it
                # missed a publish: the store may have restarted from a state older than the submit, its
                # reader's queue (the lost `queued`) emptied by this read. Its cursor is still below the
                # request's first id, which the log ends before, so no gap shows: end it rather than ping
                # for ever; the reconnect (no cursor) gets the 404 of a request that is gone.
                self.finished = True
                return
            kept = self._keep(events)
            if kept:
                yield kept
            if len(events) < page:
                return
            # Growing pages: a client that leaves after its first events (a reconnect that found what it
            # wanted, a probe) is noticed before the server has parsed the whole backlog for nobody.
            page = min(PAGE, page * 4)

    def _first_event_lost(self, bounds: LogBounds, events: list[Event]) -> bool:
        """A log read from before the request's first event (`first_event`) shows it gone (never kept, or
        lost in a store restart) or another request's. No read of its own: the page's bounds and events."""
        first = self.first_event
        if first is None or self.cursor >= first:
            return False
        if not bounds.holds(first):
            return True
        for event in events:
            if event.seq >= first:
                return event.seq != first or event.request_id != self.request_id
        return False  # (the page ends before it: a later page tells)

    async def _log(self, page: int = PAGE, gate: asyncio.Semaphore | None = None, *,
                   since: float | None = None) -> AsyncIterator[list[Event]]:
        """`_backlog` in a response that has started: a read that meets a store that cannot answer for now
        (restarting, loading its data, busy, a pool at its bound) is tried again every LOG_RETRY_SECONDS
        from the cursor, where the last batch sent left it, instead of ending the stream (a browser's
        EventSource would stop at the 503 of its reconnect). Meanwhile an empty batch (a ping) goes out
        `idle_seconds` after the last batch sent (`since`: before this read; None: now), and again every
        `idle_seconds`. Any other error raises."""
        last_sent = time.monotonic() if since is None else since
        while True:
            try:
                async with aclosing(self._backlog(page, gate)) as backlog:
                    async for batch in backlog:
                        yield batch
                        last_sent = time.monotonic()
                return
            except Exception as error:
                if not store_unavailable(error):
                    raise
            await asyncio.sleep(LOG_RETRY_SECONDS)
            if time.monotonic() - last_sent >= self.idle_seconds:
                yield []
                last_sent = time.monotonic()

    def _backlog_read(self) -> AsyncIterator[list[Event]]:
        """The first backlog read of a stream not opened: waits out a store error once its caller has
        answered (`_answered`), else raises for the caller's 503."""
        return self._log(FIRST_PAGE) if self._answered else self._backlog(FIRST_PAGE)

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Batches of events; an empty batch means `idle_seconds` passed without one for this stream (send a
        ping).
        A reader usually leaves it at its end (a terminal event): closing it closes the generator it is
        reading from at once (aclosing; an `async for` alone leaves that one to the garbage collector's
        finalizer, a task and a loop wake-up later)."""
        if self._live_from_start:  # every event after the cursor comes live (a gap sends it to the log)
            try:
                async with aclosing(self._live(self.reader)) as live:  # type: ignore[arg-type]
                    async for batch in live:
                        yield batch
            finally:
                self.close()
            return
        if self._ahead is not None:  # an ended request's, read on by `exhausted`: the log has the rest
            batch, self._ahead = self._ahead, None
            yield batch
            # FIRST_PAGE * 4: the page `_backlog` reads after its first when that one was full
            async with aclosing(self._log(FIRST_PAGE * 4)) as backlog:
                async for batch in backlog:
                    yield batch
            return
        if self._first is not None:  # opened: joined (unless ended) and the first page read
            try:
                async with aclosing(self._log(FIRST_PAGE)) as backlog:
                    async for batch in backlog:
                        yield batch
                if self.reader is not None:
                    async with aclosing(self._live(self.reader)) as live:
                        async for batch in live:
                            yield batch
            finally:
                self.close()
            return
        if self.request_id is not None:
            status = self.request_status
            if status is None:
                fields = await self.store.request_fields(self.request_id)
                status = fields.get("st") if fields else None
            if status is None or status in keys.TERMINAL_STATUSES:
                # Ended: its terminal event is already in the log, so the log alone is the whole answer.
                async with aclosing(self._backlog_read()) as backlog:
                    async for batch in backlog:
                        yield batch
                return
        self.reader = await self.hub.join(self.session_id)
        try:
            async with aclosing(self._backlog_read()) as backlog:
                async for batch in backlog:
                    yield batch
            async with aclosing(self._live(self.reader)) as live:
                async for batch in live:
                    yield batch
        finally:
            self.close()

    async def _live(self, reader: Reader) -> AsyncIterator[list[Event]]:
        """Step 3: live batches, dropping ids already sent; the log again after a gap, overflow or idle.
        A ping goes out when the stream (not just the session) has sent nothing for `idle_seconds`: a
        request's stream behind another request of its session gets that one's batches, none of them its
        own, and the queue's wait then never times out."""
        idle = IdleDeadline(self.idle_seconds)  # one timer per idle period, not one per wait (sessions/idle.py)
        last_sent = time.monotonic()  # of the last batch this stream yielded (events or a ping)
        try:
            while not self.finished:
                try:
                    live = await idle.wait(reader.queue.get())
                except TimeoutError:
                    live = None
                if live is None or reader.overflowed or (live and live[0].seq > self.cursor + 1) or (
                        self.request_id is None and live and live[0].seq <= self.cursor):
                    # Idle, overflowed or a gap: the log is the truth (a publish may have been missed); or,
                    # for a session stream, ids that may be a recycled session's new life (the log says: a
                    # gap, or another owner). A request stream's own request id tells it. (`_read_page`
                    # clears `overflowed` and empties the queue, just before the read that covers them.)
                    # A resubscribe sends every reader to the log at once, as the store comes back from a
                    # restart (still loading) or past a pool's bound: `_log` waits and reads again, pinging.
                    sent = False
                    async with aclosing(self._log(gate=self.hub.rereads, since=last_sent)) as backlog:
                        async for batch in backlog:
                            sent = True  # (a ping while it waited counts: it is the idle period's)
                            yield batch
                            last_sent = time.monotonic()
                    now = time.monotonic()
                    if not sent and (live is None or now - last_sent >= self.idle_seconds):
                        yield []
                        sent = True
                    if sent:
                        last_sent = now
                    continue
                kept = self._keep(live)
                now = time.monotonic()
                if kept:
                    yield kept
                    last_sent = now
                elif now - last_sent >= self.idle_seconds:  # others' events only, for as long as a ping waits
                    yield []
                    last_sent = now
        finally:
            idle.close()
