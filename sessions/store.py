"""The API's view of the store: submit, inspect, cancel, and read session logs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.events import Event
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import Transitions

DEFAULT_GROUP = "default"  # always exists: where a request naming no group goes
MODEL_NAME = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]{1,256}")


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
                 cluster: bool = False) -> None:
        self.redis = redis
        self.scripts = Scripts(lean or redis, single_server=not cluster)
        self.transitions = Transitions(self.scripts, lease_ms=int(lease_seconds * 1000), session_ttl=session_ttl)
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

    async def session_state(self, sid: str) -> tuple[str | None, int]:
        """The session's owner (None when it does not exist or expired) and its last event id, in one read."""
        owner, seq = await self.redis.hmget(keys.session_meta(sid), ["tn", "seq"])
        return (None if owner is None else text(owner)), int(seq or 0)

    async def read_events(self, sid: str, after: int, limit: int = 1000) -> tuple[int, list[Event]]:
        """Events with id > after, oldest first; also the last id the session has assigned."""
        reply = await self.transitions.read_log(sid, after, limit)
        return int(reply[0]), [Event.parse(e) for e in reply[1:]]


async def register_group(redis: Any, group: str) -> None:
    """Make a group known: in the registry, and with its copies of the policy and tenant weights
    (decisions read those from the group's own slot). Once per group and process; idempotent."""
    if await redis.sadd(keys.GROUPS, group):
        await copy_policy(redis, group)


class ModelConflict(ValueError):
    """The model is already served by another group (`group`)."""

    def __init__(self, model: str, group: str) -> None:
        super().__init__(f"model {model!r} is served by group {group!r}")
        self.model = model
        self.group = group


def check_model_name(model: str) -> str:
    """1-256 characters, none of them whitespace or control (`meta-llama/Llama-3.1-8B-Instruct`,
    `qwen2.5:7b`): a model name is echoed in responses and listed by /v1/models."""
    if not MODEL_NAME.fullmatch(model):
        raise ValueError("a model name is 1-256 characters, none of them whitespace or control characters")
    return model


# Atomic on the registry's one key (a cluster routes it to that key's slot): claim the model for the
# group unless another group holds it (then answer that group), and drop the group's other model.
_DECLARE = """
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner and owner ~= ARGV[2] then return owner end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i + 1] == ARGV[2] and all[i] ~= ARGV[1] then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return false
"""


async def declare_group(redis: Any, group: str, model: str | None = None) -> None:
    """Register the group and, when `model` is given, make it the group's one model (replacing the
    model it named before). ModelConflict when another group serves that model; then nothing is
    written (unless that group claimed the model meanwhile, after the first check)."""
    if model is not None:
        check_model_name(model)
        owner = await redis.hget(keys.MODELS, model)
        if owner is not None and text(owner) != group:
            raise ModelConflict(model, text(owner))
    await register_group(redis, group)
    if model is not None:
        owner = await redis.eval(_DECLARE, 1, keys.MODELS, model, group)
        if owner is not None:
            raise ModelConflict(model, text(owner))


async def forget_group_model(redis: Any, group: str) -> None:
    """The group names no model any more (it stays a group)."""
    stale = [m for m, g in (await redis.hgetall(keys.MODELS)).items() if text(g) == group]
    if stale:
        await redis.hdel(keys.MODELS, *stale)


async def group_models(redis: Any) -> dict[str, str]:
    """group -> the model it serves, for the groups that name one."""
    return {text(g): text(m) for m, g in (await redis.hgetall(keys.MODELS)).items()}


async def group_of_model(redis: Any, model: str) -> str | None:
    group = await redis.hget(keys.MODELS, model)
    return None if group is None else text(group)


async def group_exists(redis: Any, group: str) -> bool:
    """Declared (by an operator) or served (a worker registered it); `default` always exists."""
    return group == DEFAULT_GROUP or bool(await redis.sismember(keys.GROUPS, group))


async def copy_policy(redis: Any, group: str) -> None:
    """Copy sg:policy and sg:tenants into the group's control plane."""
    policy = await redis.hgetall(keys.POLICY)
    weights = await redis.hgetall(keys.TENANT_WEIGHTS)
    if policy:
        await redis.hset(keys.group_key(group, "pol"), mapping=policy)
    if weights:
        await redis.hset(keys.group_key(group, "tw"), mapping=weights)
