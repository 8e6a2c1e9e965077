"""The API's view of the store: submit, inspect, cancel, and read session logs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from sessions import keys
from sessions.events import Event
from sessions.requests import NewRequest
from sessions.resp import LeanRedis
from sessions.scripts import Scripts


@dataclass(frozen=True)
class SubmitResult:
    outcome: str  # "ok" | "forbidden"
    request_id: str
    first_event_id: int = 0


class SessionStore:
    """Async operations on sessions and requests; every write is one atomic script.

    The scripts go through `lean` when given (the API's: its submit lies on every first token's way,
    see sessions/resp.py), else through `redis` like the plain reads."""

    def __init__(self, redis: Redis, *, session_ttl: int, lease_seconds: float, lean: LeanRedis | None = None) -> None:
        self.redis = redis
        self.scripts = Scripts(lean or redis)
        self.session_ttl = session_ttl
        self.lease_ms = int(lease_seconds * 1000)

    async def submit(self, req: NewRequest, *, owner: str = "") -> SubmitResult:
        sid, rid = req.session_id, req.request_id
        reply = await self.scripts.submit(
            keys=[keys.request(rid), keys.session_meta(sid), keys.session_queue(sid), keys.session_log(sid),
                  keys.request_input(rid)],
            args=[self.lease_ms, rid, sid, req.tenant, req.group, req.priority, req.max_tokens, req.input_text,
                  req.input_kind, json.dumps(req.params, separators=(",", ":")), req.input_tokens, owner],
        )
        outcome = _text(reply[0])
        return SubmitResult(outcome, rid, int(reply[1]) if outcome == "ok" else 0)

    async def request_fields(self, rid: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(keys.request(rid))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

    async def request_input(self, rid: str) -> str | None:
        value = await self.redis.get(keys.request_input(rid))
        return None if value is None else _text(value)

    async def cancel(self, rid: str, *, owner: str = "") -> list[str]:
        reply = await self.scripts.cancel(keys=[keys.request(rid)],
                                          args=[self.lease_ms, self.session_ttl, rid, owner])
        return [_text(x) for x in reply]

    async def session_state(self, sid: str) -> tuple[str | None, int]:
        """The session's owner (None when it does not exist or expired) and its last event id, in one read."""
        owner, seq = await self.redis.hmget(keys.session_meta(sid), ["tn", "seq"])
        return (None if owner is None else _text(owner)), int(seq or 0)

    async def read_events(self, sid: str, after: int, limit: int = 1000) -> tuple[int, list[Event]]:
        """Events with id > after, oldest first; also the last id the session has assigned."""
        reply = await self.scripts.read_log(keys=[keys.session_meta(sid), keys.session_log(sid)],
                                            args=[after, limit])
        return int(reply[0]), [Event.parse(e) for e in reply[1:]]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
