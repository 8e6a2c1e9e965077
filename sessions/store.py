"""The API's view of the store: submit, inspect, cancel, and read session logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.events import Event
from sluicegate.sessions.registry import DEFAULT_GROUP, group_exists, register_group
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import LOG_MAX_EVENTS, Transitions


def cursor_trimmed(cursor: int, oldest_kept: int) -> bool:
    """A resume cursor the log can no longer continue without a gap: events after it were trimmed
    (0 means "from the oldest kept event", which is always possible)."""
    return 0 < cursor < oldest_kept - 1


class CursorExpired(Exception):
    """A cursor older than the oldest kept event (minus one): the events between were trimmed
    (--session-log-max-events), so a resume from it would have a gap."""

    def __init__(self, cursor: int, oldest: int) -> None:
        super().__init__(f"event id {cursor} was trimmed from the session's log; the oldest kept event is "
                         f"{oldest}")
        self.cursor = cursor
        self.oldest = oldest


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
        self.scripts = Scripts(lean or redis, single_server=not cluster)
        self.transitions = Transitions(self.scripts, lease_ms=int(lease_seconds * 1000), session_ttl=session_ttl,
                                       log_max_events=log_max_events)
        self.session_ttl = session_ttl
        self._known_groups: set[str] = set()

    async def submit(self, req: NewRequest, *, owner: str = "") -> SubmitResult:
        """Outcome "unknown_group" (nothing stored) for a group neither declared nor served: a caller
        must not create groups, as the scheduler sweeps every one of them."""
        if req.group not in self._known_groups:
            if req.group == DEFAULT_GROUP:
                await register_group(self.redis, req.group)
            elif not await group_exists(self.redis, req.group):
                return SubmitResult("unknown_group", req.request_id)
            self._known_groups.add(req.group)  # groups are never removed: a positive cache stays true
        outcome, seq = await self.transitions.submit(req, owner=owner)
        return SubmitResult(outcome, req.request_id, seq)

    async def request_fields(self, rid: str) -> dict[str, str] | None:
        if not keys.valid_request_id(rid):
            return None
        raw = await self.redis.hgetall(keys.request(rid))
        if not raw:
            return None
        return {text(k): text(v) for k, v in raw.items()}

    async def request_input(self, rid: str) -> str | None:
        if not keys.valid_request_id(rid):
            return None
        value = await self.redis.get(keys.request_input(rid))
        return None if value is None else text(value)

    async def cancel(self, rid: str, *, owner: str = "") -> list[str]:
        if not keys.valid_request_id(rid):
            return ["missing"]
        return await self.transitions.cancel(rid, owner=owner)

    async def session_state(self, sid: str) -> tuple[str | None, int, int]:
        """The session's owner (None when it does not exist or expired), its last event id and the id of
        its oldest kept event (older ones were trimmed, --session-log-max-events), in one read."""
        owner, seq, base = await self.redis.hmget(keys.session_meta(sid), ["tn", "seq", "base"])
        return (None if owner is None else text(owner)), int(seq or 0), int(base or 1)

    async def read_events(self, sid: str, after: int, limit: int = 1000) -> tuple[int, list[Event]]:
        """Events with id > after (0: from the oldest kept), oldest first; also the last id the session
        has assigned. Raises CursorExpired when events right after `after` were trimmed (a gap)."""
        reply = await self.transitions.read_log(sid, after, limit)
        if cursor_trimmed(after, int(reply[1])):
            raise CursorExpired(after, int(reply[1]))
        return int(reply[0]), [Event.parse(e) for e in reply[2:]]
