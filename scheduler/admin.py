"""Runtime tuning and inspection: tenant weights, group quotas, queue statistics.

Weights and quotas are read by the dispatch script on every decision, so a change takes effect on
the next scheduling decision without restarting anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from sluicegate.scheduler.limits import DEFAULTS, TenantLimits, all_limits, read_limits, write_limits
from sluicegate.scheduler.quota import MIN_RATE
from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.metrics_store import read_metrics
from sluicegate.sessions.registry import COPY_ROUNDS, register_group
from sluicegate.sessions.runs import shown_info
from sluicegate.sessions.scripts import Scripts


def _number(text: str) -> float | int:
    """A stored quota field as JSON renders it: an integer only where a double holds it exactly (a larger
    one, stored before the bounds, stays a float: orjson refuses integers past 64 bits)."""
    value = float(text)
    return int(value) if value.is_integer() and abs(value) <= 2**53 else value


async def live_workers(redis: Any, group: str, wids: Iterable[str]) -> set[str]:
    """The workers among `wids` whose liveness key is there, in one pipelined round trip (the group's slot)."""
    ordered = sorted(set(wids))
    if not ordered:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for wid in ordered:
            pipe.exists(keys.worker(group, wid))
        found = await pipe.execute()
    return {wid for wid, up in zip(ordered, found, strict=True) if up}


async def live_free_slots(redis: Any, group: str, idle: int, dead: Iterable[str]) -> int:
    """The group's free slots: its `idle` tickets (LLEN) less those of the registered workers found `dead`.
    A worker killed while idle keeps its tickets in the idle list until a dispatch pops them or a live
    worker's heartbeat reaps them (heartbeat.lua). Counted on the server (LPOS ... COUNT 0, one round trip
    for all), so a read costs the same with 10,000 free slots: no list is sent back."""
    gone = sorted(set(dead))
    if not gone or not idle:
        return idle
    async with redis.pipeline(transaction=False) as pipe:
        for wid in gone:
            pipe.lpos(keys.group_key(group, "idle"), wid, count=0)
        found = await pipe.execute()
    return max(0, idle - sum(len(positions or ()) for positions in found))


class Tuning:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.scripts = Scripts(redis, single_server=not isinstance(redis, RedisCluster))

    async def set_weight(self, tenant: str, weight: float) -> None:
        """The source (sg:tenants), then each group's copy, where its decisions read it: set by one call in
        the group's slot (set_weight.lua) that also rescores the tenant's share of the running slots, so
        that fair-share preemption goes by the new weight at the next decision. Two PUTs of one tenant
        racing could leave every copy at the older value (A's source, B's source, B's copies, A's copies):
        the source is read again after the copies, and copied again until it reads as copied (every
        writer writes the source first, so the last copy is of its final value), as copy_policy does."""
        await self.redis.hset(keys.TENANT_WEIGHTS, tenant, weight)
        value: Any = weight
        for _ in range(COPY_ROUNDS):
            for group in await self.groups():
                await self.scripts.call("set_weight", [keys.group_prefix(group)], [tenant, value])
            now = await self.redis.hget(keys.TENANT_WEIGHTS, tenant)
            if now is None or float(text(now)) == float(value):
                return
            value = text(now)

    async def set_limits(self, tenant: str, changes: dict[str, int | None]) -> TenantLimits:
        """The tenant's guardrails (scheduler/limits.py); the API reads them through a short cache."""
        return await write_limits(self.redis, tenant, changes)

    async def set_quota(self, group: str, quota: dict[str, float | None]) -> dict[str, float | int]:
        """Set the given quota fields; a field given as null is removed (unlimited). One call in the group's
        slot (set_quota.lua): the fields, a removed quota's state and a removed tokens/s quota's new bucket
        generation change together, so no run's refund or decision lands on a change half made."""
        to_set = [item for k, v in quota.items() if v is not None for item in (k, v)]
        to_clear = [k for k, v in quota.items() if v is None]
        await register_group(self.redis, group)
        await self.scripts.call("set_quota", [keys.group_prefix(group)], [len(to_set) // 2, *to_set, *to_clear])
        return await self.quota(group)

    async def quota(self, group: str) -> dict[str, float | int]:
        raw = await self.redis.hgetall(keys.group_key(group, "cfg"))
        return {text(k): _number(text(v)) for k, v in raw.items()}

    async def weights(self) -> dict[str, float]:
        raw = await self.redis.hgetall(keys.TENANT_WEIGHTS)
        return {text(k): float(v) for k, v in raw.items()}

    async def groups(self) -> list[str]:
        return sorted(text(g) for g in await self.redis.smembers(keys.GROUPS))

    async def tenants(self) -> list[dict[str, Any]]:
        """Every tenant with a weight, a limit or a counter: its guardrails and its counter per group."""
        weights = await self.weights()
        limits = await all_limits(self.redis)
        counters: dict[str, dict[str, float]] = {}
        for group in await self.groups():
            for tenant, value in (await self.redis.hgetall(keys.group_key(group, "vtc"))).items():
                counters.setdefault(text(tenant), {})[group] = float(value)
        names = sorted(set(weights) | set(limits) | set(counters))
        return [{"tenant": t, "weight": weights.get(t, 1.0), **limits.get(t, DEFAULTS).as_dict(),
                 "virtual_token_counter": counters.get(t, {})} for t in names]

    async def tenant(self, tenant: str) -> dict[str, Any]:
        """One tenant's settings (the answer to its PUT)."""
        weight = await self.redis.hget(keys.TENANT_WEIGHTS, tenant)
        limits = await read_limits(self.redis, tenant)
        return {"tenant": tenant, "weight": 1.0 if weight is None else float(weight), **limits.as_dict()}

    async def group_state(self, group: str) -> dict[str, Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.group_key(group, "cfg"))
            pipe.hgetall(keys.group_key(group, "qs"))
            pipe.zcard(keys.group_key(group, "run"))
            pipe.llen(keys.group_key(group, "idle"))
            pipe.hgetall(keys.group_key(group, "cn"))
            pipe.zcard(keys.group_key(group, "pre"))
            pipe.hkeys(keys.group_key(group, "workers"))
            cfg, qs, running, idle, ready, stopping, registered = await pipe.execute()
        wids = [text(wid) for wid in registered]
        live = await live_workers(self.redis, group, wids)
        free_slots = await live_free_slots(self.redis, group, idle, (wid for wid in wids if wid not in live))
        state = {text(k): text(v) for k, v in qs.items()}
        quota = {text(k): _number(text(v)) for k, v in cfg.items()}
        # when a rate quota admits next (qwake: the group's wake-up, "wake", also times preemptions' waits)
        wake = float(state["qwake"]) if "qwake" in state else None
        ready_by_class = {text(k): int(v) for k, v in ready.items()}
        # The cap holds work back while it binds and work waits (the dispatch's own gate, quotas.lua
        # in_flight: runs stopped under the cap count until their workers let go), whatever the last throttle was.
        cap = quota.get("max_concurrency")
        capped = cap is not None and running + stopping >= cap and sum(ready_by_class.values()) > 0
        return {
            "group": group,
            "quota": quota,
            "running": running,
            "free_slots": free_slots,
            "ready_sessions_by_class": ready_by_class,
            "throttled": wake is not None or capped,
            # With no free ticket the dispatch never reaches the quota gate, which alone writes the reason:
            # a cap that holds work back with no rate quota's wake-up pending is the reason, not a stale one.
            "last_throttle_reason": "max_concurrency" if capped and wake is None else state.get("throttled"),
            "next_admission_ms": wake,
            "token_bucket_level": await self._token_level_now(quota, state),
        }

    async def _token_level_now(self, quota: dict[str, float | int], state: dict[str, str]) -> float | None:
        """The tokens/s bucket's level now, refilled since its last change as the scheduler reckons it
        (quotas.lua token_level, on the server's clock); a full bucket before the first dispatch; None
        without a tokens/s quota. The stored level is as it stood at the last dispatch or refund."""
        if quota.get("tokens_per_second") is None:
            return None
        rate = max(float(quota["tokens_per_second"]), MIN_RATE)
        cap = float(quota.get("burst_tokens", rate))
        if "lvl" not in state or "at" not in state:
            return cap
        seconds, micros = await self.redis.time()  # a cluster: any master's clock, never before `at` here
        elapsed_ms = max(0.0, seconds * 1000 + micros // 1000 - float(state["at"]))
        return min(cap, float(state["lvl"]) + elapsed_ms * rate / 1000)

    async def stats(self) -> dict[str, Any]:
        """Queue depth by group, priority and tenant; running; workers; per-group quota state."""
        names = await self.groups()
        raw_depth = (await read_metrics(self.redis, names, only=("depth",))).get("depth", {})
        depth: list[dict[str, Any]] = []
        by_group: dict[str, int] = {}
        for label, value in raw_depth.items():
            n = int(value)
            if n <= 0:
                continue
            group, priority, tenant = label.split("|", 2)
            depth.append({"group": group, "priority": int(priority), "tenant": tenant, "queued": n})
            by_group[group] = by_group.get(group, 0) + n
        groups = [await self.group_state(g) for g in names]
        workers = await self.workers()
        return {
            "queued": sum(by_group.values()),
            "queued_by_group": by_group,
            "queue_depth": sorted(depth, key=lambda d: (d["group"], -d["priority"], d["tenant"])),
            "running": sum(g["running"] for g in groups),
            "groups": groups,
            "workers": workers,
            "tenants": await self.tenants(),
        }

    async def workers(self) -> list[dict[str, Any]]:
        """Registered workers whose liveness key is there. A read writes nothing: deleting a lapsed entry
        here raced its worker's rejoin (a worker live on the roster never registers again), and the next
        heartbeat of any worker of the group reaps the dead ones (heartbeat.lua)."""
        alive = []
        for group in await self.groups():
            registered = await self.redis.hgetall(keys.group_key(group, "workers"))
            for wid, info in sorted((text(k), text(v)) for k, v in registered.items()):
                if await self.redis.exists(keys.worker(group, wid)):
                    alive.append({"worker_id": wid, "group": group, **shown_info(info)})
        return alive
