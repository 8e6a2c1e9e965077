"""The API's view of the store: submit, inspect, cancel, and read session logs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.events import Event
from sluicegate.sessions.registry import DEFAULT_GROUP, group_exists, register_group
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import LOG_HEADER, LOG_MAX_EVENTS, Transitions


def parse_holes(raw: Any) -> tuple[tuple[int, int], ...]:
    """The meta's `hl`: "hs:he,..." pairs, ids hs+1 .. he-1 skipped after a store restart
    (sessions/lua/includes/log_ids.lua)."""
    holes = []
    for pair in text(raw or "").split(","):
        if pair:
            start, end = pair.split(":")
            holes.append((int(start), int(end)))
    return tuple(holes)


@dataclass(frozen=True)
class LogBounds:
    """What a resume cursor is checked against: the session's last event id, its oldest kept one
    (older ones were trimmed, --session-log-max-events) and the id holes its store's restarts left."""

    last_id: int
    oldest_kept: int = 1
    holes: tuple[tuple[int, int], ...] = ()
    owner: str | None = None  # the session's tenant, where the read says it (read_log)

    def trimmed(self, cursor: int) -> bool:
        """Events right after the cursor were trimmed: resuming from it would skip them (0 means "from
        the oldest kept event", which is always possible)."""
        return 0 < cursor < self.resumable_from()

    def resumable_from(self) -> int:
        """The oldest cursor a read continues from without a gap: the oldest kept id - 1, or, when the
        ids just before the oldest kept one are a restart's hole (never kept, so never trimmed), the last
        id before that hole. The client most likely to hold that id is one cut off by the restart."""
        edge = self.oldest_kept
        for start, end in reversed(self.holes):  # (ascending; holes that run into each other chain)
            if end >= edge:
                edge = min(edge, start + 1)
        return edge - 1

    def holds(self, event_id: int) -> bool:
        """The log assigned this id and did not lose it in a store restart (it may have been trimmed)."""
        return 0 < event_id <= self.last_id and not any(start < event_id < end for start, end in self.holes)

    def lost_before(self, cursor: int) -> int | None:
        """When the cursor may name an event the store lost in a restart from an older state (AOF
        everysec, a failover), the last id kept before it; else None. Its id may have been issued again
        to another event, so a resume from it could silently skip events. A cursor past the last id is
        never resumable either (lost, or the session was recycled after its TTL)."""
        for start, end in self.holes:
            if start < cursor < end - 1:
                return start
        return None


class CursorExpired(Exception):
    """A cursor the log cannot continue from without a gap: the events after it were trimmed
    (--session-log-max-events), or it names an event lost when the store restarted from an older state."""

    def __init__(self, cursor: int, oldest: int, lost_before: int | None = None) -> None:
        if lost_before is None:
            message = f"event id {cursor} was trimmed from the session's log; the oldest kept event is {oldest}"
        else:
            message = (f"event id {cursor} was lost when the store restarted from an older state; the last "
                       f"event kept before it is {lost_before}")
        super().__init__(message)
        self.cursor = cursor
        self.oldest = oldest
        self.lost_before = lost_before


def log_gap(bounds: LogBounds, after: int) -> CursorExpired | None:
    """The gap a read after `after` would leave (events trimmed, or `after` lost in a store restart)."""
    if bounds.trimmed(after):
        return CursorExpired(after, bounds.oldest_kept)
    lost_before = bounds.lost_before(after) if after <= bounds.last_id else bounds.last_id
    if lost_before is not None:
        return CursorExpired(after, bounds.oldest_kept, lost_before)
    return None


@dataclass(frozen=True)
class SubmitResult:
    outcome: str  # "ok" | "forbidden" | "unknown_group"
    request_id: str
    first_event_id: int = 0


class SessionStore:
    """Async operations on sessions and requests; every write is an atomic function call (two on a
    cluster, see sessions/transitions.py).

    The functions go through `lean` when given (the API's on one server: its submit lies on every first
    token's way, see sessions/resp.py), else through `redis` like the plain reads."""

    def __init__(self, redis: Any, *, session_ttl: int, lease_seconds: float, lean: Any = None,
                 cluster: bool = False, log_max_events: int = LOG_MAX_EVENTS) -> None:
        self.redis = redis
        self.lean = lean
        self.scripts = Scripts(lean or redis, single_server=not cluster)
        self.transitions = Transitions(self.scripts, lease_ms=int(lease_seconds * 1000), session_ttl=session_ttl,
                                       log_max_events=log_max_events)
        self.session_ttl = session_ttl
        self._known_groups: set[str] = set()

    async def known_group(self, group: str) -> bool:
        """Whether `group` takes requests: declared or served, or the default group (registered at its first
        use). A caller must not create groups, as the scheduler sweeps every one of them. Cached once known:
        groups are never removed, so a positive answer stays true."""
        if group not in self._known_groups:
            if group == DEFAULT_GROUP:
                await register_group(self.redis, group)
            elif not await group_exists(self.redis, group):
                return False
            self._known_groups.add(group)
        return True

    async def submit(self, req: NewRequest, *, owner: str = "",
                     on_sending: Callable[[], None] | None = None) -> SubmitResult:
        """Outcome "unknown_group" (nothing stored) for a group neither declared nor served (known_group).
        `on_sending`: called just before the submit's call is written (Transitions.submit)."""
        if not await self.known_group(req.group):
            return SubmitResult("unknown_group", req.request_id)
        outcome, seq = await self.transitions.submit(req, owner=owner, on_sending=on_sending)
        return SubmitResult(outcome, req.request_id, seq)

    async def request_fields(self, rid: str) -> dict[str, str] | None:
        if not keys.valid_request_id(rid):
            return None
        raw = await self.redis.hgetall(keys.request(rid))
        if not raw:
            return None
        return {text(k): text(v) for k, v in raw.items()}

    async def request_head(self, rid: str) -> dict[str, str] | None:
        """The four fields a request's event stream needs (tenant, session, first event, status), read
        through the lean client where there is one: it lies on every resumable stream's way, where an
        HGETALL through redis-py cost a quarter of the route's time."""
        if not keys.valid_request_id(rid):
            return None
        names = ("tn", "sid", "fs", "st")
        if self.lean is not None:
            values = await self.lean.execute("HMGET", keys.request(rid), *names)
        else:
            values = await self.redis.hmget(keys.request(rid), list(names))
        if values[1] is None:  # every stored request has its session
            return None
        return {name: text(value) for name, value in zip(names, values, strict=True) if value is not None}

    async def request_input(self, rid: str) -> str | None:
        if not keys.valid_request_id(rid):
            return None
        value = await self.redis.get(keys.request_input(rid))
        return None if value is None else text(value)

    async def cancel(self, rid: str, *, owner: str = "") -> list[str]:
        if not keys.valid_request_id(rid):
            return ["missing"]
        return await self.transitions.cancel(rid, owner=owner)

    async def session_state(self, sid: str) -> tuple[str | None, LogBounds]:
        """The session's owner (None when it does not exist or expired) and its log's bounds, in one read."""
        names = ("tn", "seq", "base", "hl")
        if self.lean is not None:  # on a resume's way (sessions/resp.py)
            owner, seq, base, holes = await self.lean.execute("HMGET", keys.session_meta(sid), *names)
        else:
            owner, seq, base, holes = await self.redis.hmget(keys.session_meta(sid), list(names))
        return (None if owner is None else text(owner)), LogBounds(int(seq or 0), int(base or 1), parse_holes(holes))

    async def read_page(self, sid: str, after: int, limit: int = 1000) -> tuple[LogBounds, list[Event]]:
        """Events with id > after (0: from the oldest kept), oldest first, and the log's bounds as read in
        the same call (a stream checks its cursor against them instead of reading them first). No gap
        check: see `log_gap`."""
        reply = await self.transitions.read_log(sid, after, limit)
        bounds = LogBounds(int(reply[0]), int(reply[1]), parse_holes(reply[2]), text(reply[3]) or None)
        return bounds, [Event.parse(e) for e in reply[LOG_HEADER:]]

    async def read_events(self, sid: str, after: int, limit: int = 1000) -> tuple[int, list[Event]]:
        """Events with id > after (0: from the oldest kept), oldest first; also the last id the session
        has assigned. Raises CursorExpired when events right after `after` were trimmed or `after` was
        lost in a store restart (a gap either way)."""
        bounds, events = await self.read_page(sid, after, limit)
        gap = log_gap(bounds, after)
        if gap is not None:
            raise gap
        return bounds.last_id, events
