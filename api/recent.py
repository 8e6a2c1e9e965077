"""Requests this API process has just accepted, so that their event stream starts without a read.

The resumable route is two requests: the submit, then GET /v1/requests/{id}/events, usually on the
same process a moment later. That GET needs the request's session, tenant and first event id, which
the submit has just written: measured with 64 clients, reading them again (one HMGET) cost about a
tenth of the route's Redis CPU. An entry is taken once (a later reconnect reads as usual) and lives a
few seconds, well inside the session's TTL, so the request cannot have expired meanwhile. Its status
is not kept (it changes): such a stream joins the session's channel before reading the log, as the
chat route's does, which is exact whatever the status; and the read checks that the request's first
event is still in the log (a store restarted from an older state may have lost it: then the route
reads the request as usual, and answers 404 when it is gone).
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_AGE = 10.0  # seconds; never more than half the session TTL
MAX_ENTRIES = 4096  # the oldest go first; a miss only costs the read


class RecentSubmits:
    def __init__(self, session_ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = min(MAX_AGE, session_ttl / 2)
        self.clock = clock
        self.entries: dict[str, tuple[float, dict[str, str]]] = {}  # request id -> (noted at, head)

    def note(self, request_id: str, session_id: str, tenant: str, first_event_id: int) -> None:
        if len(self.entries) >= MAX_ENTRIES:
            for stale in list(self.entries)[: MAX_ENTRIES // 4]:
                del self.entries[stale]
        self.entries[request_id] = (self.clock(), {"sid": session_id, "tn": tenant, "fs": str(first_event_id)})

    def take(self, request_id: str) -> dict[str, str] | None:
        """The head (`sid`, `tn`, `fs`, as SessionStore.request_head has them, without `st`) once."""
        hit = self.entries.pop(request_id, None)
        if hit is None or self.clock() - hit[0] > self.max_age:
            return None
        return hit[1]
