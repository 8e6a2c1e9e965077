"""Requests this API process has just accepted, so that their event stream starts without a read.

The resumable route is two requests: the submit, then GET /v1/requests/{id}/events, usually on the
same process a moment later. That GET needs the request's session, tenant and first event id, which
the submit has just written: measured with 64 clients, reading them again (one HMGET) cost about a
tenth of the route's Redis CPU. An entry is taken once (a later reconnect reads as usual) and lives a
few seconds, well inside the session's TTL, so the request cannot have expired meanwhile. Its status
is not kept (it changes): such a stream joins the session's channel before reading the log, as the
chat route's does, which is exact whatever the status; and the read checks that the request's first
event is still in the log (a store restarted from an older state may have lost it: then the route
reads the request as usual, and answers 404 when it is gone). The stream of a reader taken at the submit
(below) reads no log unless it misses a publish, so it makes no such check first: a request lost in
between ends its stream without a terminal event, as the chat route's does, and a reconnect gets the 409
of a cursor past the log, or, when the stream had sent none of its events (the log read that found the
request's first event gone emptied the reader's queue: EventStream's `first_event`), the 404.

When this process already follows the submit's session (its channel is subscribed and confirmed: a
client that names its session), the submit also takes a reader of that channel before it writes, as
the chat route does (EventHub.join_live): every event of the request is then in the reader, and a GET
without a cursor streams it live with no log read at all, as a chat call on that session does. A reader
nobody takes is left (hub.leave) after READER_MAX_AGE (one timer at a time, so an idle process gives it
back too) or when its entry is pushed out; until then its queue holds the session's events, as any
reader's (bounded: an overflow sends it to the log).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from sluicegate.sessions.hub import Reader

MAX_AGE = 10.0  # seconds; never more than half the session TTL
READER_MAX_AGE = 2.0  # seconds a reader waits for its GET (which comes within milliseconds as a rule)
MAX_ENTRIES = 4096  # the oldest go first; a miss only costs the read


@dataclass(frozen=True)
class Accepted:
    """A request this process has just accepted: its head (`sid`, `tn`, `fs`, as SessionStore.request_head
    has them, without `st`) and, when its session was followed here, a reader that joined before the submit."""

    head: dict[str, str]
    reader: Reader | None = None


class RecentSubmits:
    def __init__(self, session_ttl: float, *, clock: Callable[[], float] = time.monotonic,
                 leave: Callable[[str, Reader], None] = lambda session_id, reader: None) -> None:
        """`leave`: gives back a reader nobody took (EventHub.leave)."""
        self.max_age = min(MAX_AGE, session_ttl / 2)
        self.reader_max_age = min(READER_MAX_AGE, self.max_age)
        self.clock = clock
        self.leave = leave
        self.entries: dict[str, tuple[float, dict[str, str]]] = {}  # request id -> (noted at, head)
        self.readers: dict[str, tuple[float, str, Reader]] = {}  # request id -> (noted at, session, reader)
        self._timer: asyncio.TimerHandle | None = None  # one at a time: gives back the readers nobody took

    def note(self, request_id: str, session_id: str, tenant: str, first_event_id: int,
             reader: Reader | None = None) -> None:
        now = self.clock()
        self._age_out(now)
        if len(self.entries) >= MAX_ENTRIES:
            for stale in list(self.entries)[: MAX_ENTRIES // 4]:
                del self.entries[stale]
                self._leave(stale)
        self.entries[request_id] = (now, {"sid": session_id, "tn": tenant, "fs": str(first_event_id)})
        if reader is not None:
            self.readers[request_id] = (now, session_id, reader)
            if self._timer is None:  # an idle process gives them back too, not only at its next submit
                self._timer = asyncio.get_running_loop().call_later(self.reader_max_age, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.clock()
        self._age_out(now)
        if self.readers:  # the oldest left is due then
            due = next(iter(self.readers.values()))[0] + self.reader_max_age - now
            self._timer = asyncio.get_running_loop().call_later(max(due, 0.0) + 0.01, self._on_timer)

    def take(self, request_id: str) -> Accepted | None:
        """What the submit left, once; None when nothing was left or it is too old."""
        now = self.clock()
        self._age_out(now)
        hit = self.entries.pop(request_id, None)
        if hit is None:
            self._leave(request_id)
            return None
        waiting = self.readers.pop(request_id, None)
        return Accepted(hit[1], waiting[2] if waiting is not None else None)

    def _age_out(self, now: float) -> None:
        """Both maps are in the order entries were noted: the too old ones are at their fronts."""
        while self.entries and now - next(iter(self.entries.values()))[0] > self.max_age:
            del self.entries[next(iter(self.entries))]
        while self.readers and now - next(iter(self.readers.values()))[0] > self.reader_max_age:
            self._leave(next(iter(self.readers)))

    def _leave(self, request_id: str) -> None:
        waiting = self.readers.pop(request_id, None)
        if waiting is not None:
            self.leave(waiting[1], waiting[2])
