"""A deterministic driver for the scheduling scripts: a real Redis and the real Lua scripts, with the
test playing the workers (register slots, pop inboxes, append, finish, hand back) and the clock pinned
through `sg:clock`, so that every decision happens at an exact, repeatable moment."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.asyncio import ConnectionPool as AsyncConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions import keys
from sluicegate.sessions.events import Event
from sluicegate.sessions.registry import register_group
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.runs import Assignment
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import Transitions, run_sync

LEASE_MS = 600_000  # long: worker liveness keys use the real clock, the pinned clock drives the rest
TTL = 3600
T0 = 1_000_000  # pinned start time (ms); never 0: the running-rank score assumes now > 0


@dataclass
class Run:
    """One assignment popped from a worker inbox: what a real worker slot would be executing."""

    rid: str
    attempt: str
    wid: str
    group: str
    next_index: int
    fenced: bool = False


@dataclass(frozen=True)
class Entry:
    seq: int
    event: str
    rid: str
    data: dict[str, Any]


class Harness:
    def __init__(self, r: redis.Redis, *, now: int = T0, lease_ms: int = LEASE_MS, cluster: bool = False) -> None:
        self.r = r
        # On a cluster the clock is the servers' own: a pinned clock is a global key, which a function
        # may not read from its plane's slot.
        self.scripts = Scripts(r, single_server=not cluster, pinned_clock=not cluster)
        self.lease_ms = lease_ms  # request leases, on the pinned clock
        self.worker_lease_ms = max(lease_ms, LEASE_MS)  # worker liveness keys expire on the real clock
        self.t = Transitions(self.scripts, lease_ms=lease_ms, session_ttl=TTL)
        self.now = now
        self.workers: dict[str, str] = {}  # worker id -> group
        self.slots: dict[str, int] = {}  # worker id -> slots
        self.own_leases: dict[str, int] = {}  # worker id -> the lease it registers and beats with, when given
        self.runs: list[Run] = []  # assignments a fake worker still holds
        self.dispatched: list[Run] = []  # every assignment ever made, in the order they were popped
        self._rids = 0
        if not cluster:
            r.set(keys.PREFIX + "clock", now)

    # -- clock, policy, tuning -------------------------------------------------------------------
    def set_clock(self, ms: int) -> None:
        self.now = ms
        self.r.set(keys.PREFIX + "clock", ms)

    def advance(self, ms: int) -> None:
        self.set_clock(self.now + ms)

    def policy(self, **fields: float) -> None:
        self.r.hset(keys.POLICY, mapping=fields)  # type: ignore[arg-type]
        for group in self.r.smembers(keys.GROUPS):
            self.r.hset(keys.group_key(group, "pol"), mapping=fields)  # type: ignore[arg-type]

    def weight(self, tenant: str, value: float) -> None:
        self.r.hset(keys.TENANT_WEIGHTS, tenant, value)
        for group in self.r.smembers(keys.GROUPS):
            self.r.hset(keys.group_key(group, "tw"), tenant, value)

    def set_weight(self, tenant: str, value: float) -> None:
        """Through the admin code path (scheduler.admin.Tuning.set_weight), as a PUT sets it; `weight` above
        writes the hashes directly."""
        self._tune(lambda tuning: tuning.set_weight(tenant, value))

    def set_quota(self, group: str, **fields: float | None) -> None:
        """Through the admin code path (Tuning.set_quota), as a PUT sets it (None removes a field); `quota`
        writes the hash directly, without what the admin path does around it (a removal's bucket generation)."""
        self._tune(lambda tuning: tuning.set_quota(group, dict(fields)))

    def _tune(self, change: Callable[[Tuning], Awaitable[Any]]) -> None:
        """`change` on a Tuning whose scripts go out with the harness's flags: on one server at the pinned clock
        (sg:clock), as every other step of a test, since a tokens/s change settles the bucket at the call's now
        (set_quota.lua); Tuning's own scripts read the server's clock, decades after the pinned T0."""
        async def put() -> None:
            client = self.async_client()
            try:
                tuning = Tuning(client)
                tuning.scripts = Scripts(client, single_server=self.scripts.single_server,
                                         pinned_clock="T" in self.scripts.flags)
                await change(tuning)
            finally:
                if isinstance(client, AsyncRedis):
                    await client.aclose(close_connection_pool=True)
                else:
                    await client.aclose()

        asyncio.run(put())

    def async_client(self) -> Any:
        """An asyncio client of the same server (or cluster) as `r`, for the admin code path."""
        if isinstance(self.r, redis.cluster.RedisCluster):
            node = self.r.get_default_node()
            return AsyncRedisCluster(host=node.host, port=node.port, decode_responses=True)
        return AsyncRedis(connection_pool=AsyncConnectionPool(**self.r.connection_pool.connection_kwargs))

    def _group(self, group: str) -> None:
        run_sync(register_group(_Sync(self.r), group))

    def quota(self, group: str, **fields: float | None) -> None:
        """Through the admin code path (scheduler.admin.Tuning.set_quota): None removes a field = unlimited."""
        self._tune(lambda tuning: tuning.set_quota(group, dict(fields)))

    # -- the worker's side -----------------------------------------------------------------------
    def add_worker(self, wid: str, group: str = "default", slots: int = 1, *, collect: bool = True,
                   lease_ms: int | None = None) -> int:
        """`collect=False`: its assignments wait in its inbox until the next `collect`. `lease_ms`: the
        worker's own lease, which it registers and heartbeats with (on the real clock for its liveness
        key, on the pinned clock for its runs), recorded on the control plane as a real worker's is.
        Without it the worker records none (as a worker of an older version): its liveness key is
        kept for `worker_lease_ms` of real time, and the callers' `lease_ms` governs its runs."""
        self.workers[wid] = group
        self.slots[wid] = slots
        if lease_ms is not None:
            self.own_leases[wid] = lease_ms
        return self._offer_slots(wid, slots, collect=collect)

    def _worker_lease(self, wid: str) -> int:
        return self.own_leases.get(wid, self.worker_lease_ms)

    def _unrecord_lease(self, wid: str) -> None:
        """A worker without its own lease records none: the long real-clock `worker_lease_ms` it registers
        with must not become its runs' lease on the pinned clock (scheduler/lua/includes/runs.lua
        worker_lease)."""
        if wid not in self.own_leases:
            self.r.hdel(keys.group_key(self.workers[wid], "wl"), wid)

    def _offer_slots(self, wid: str, free: int, held: list[str] | None = None, *, collect: bool = True) -> int:
        group = self.workers[wid]
        self._group(group)
        started = run_sync(Transitions(self.scripts, lease_ms=self._worker_lease(wid), session_ttl=TTL).register_worker(
            group, wid, free=free, total=self.slots[wid], held=held or [])).started
        self._unrecord_lease(wid)
        if collect:
            self.collect()
        return started

    def collect(self) -> list[Run]:
        """Pop every worker inbox (oldest first) and hold the new assignments."""
        new: list[Run] = []
        for wid, group in self.workers.items():
            items = self.r.lrange(keys.worker_inbox(group, wid), 0, -1)
            self.r.delete(keys.worker_inbox(group, wid))
            for item in reversed(items):  # LPUSHed: the oldest is last
                assignment = Assignment.parse(item)
                rid = assignment.request_id
                # On a cluster the worker starts the run on the data plane (refused: no longer to run).
                if assignment.fields is None and run_sync(self.t.start(
                        rid, assignment.attempt, wid, stopped_for=assignment.stopped_for)) is None:
                    run_sync(self.t.hand_back(rid, assignment.attempt, wid=wid, group=group, reason="released",
                                              return_slot=True, never_ran=True))  # as the worker's _serve
                    continue
                new.append(Run(rid, assignment.attempt, wid, group, int(self.r.hget(keys.request(rid), "n") or 0)))
        self.runs.extend(new)
        self.dispatched.extend(new)
        return new

    def run_of(self, rid: str) -> Run:
        """The newest assignment of a request that a worker still holds."""
        for run in reversed(self.runs):
            if run.rid == rid:
                return run
        raise AssertionError(f"no worker holds {rid}")

    def append(self, run: Run, count: int = 1) -> list[Any]:
        data = [json.dumps({"request_id": run.rid, "index": run.next_index + i, "text": "t"}) for i in range(count)]
        reply = run_sync(self.t.append(run.rid, run.attempt, run.next_index, data))
        if int(reply[0]) == 1:
            run.next_index += count
        elif int(reply[0]) == 0:
            run.fenced = True
        return list(reply)

    def finish(self, run: Run, outcome: str = "done", detail: str = "length", return_slot: bool = True) -> list[Any]:
        """Finish a run; on a run the worker no longer owns this only releases the slot."""
        self.runs.remove(run)
        finished = run_sync(self.t.finish(run.rid, run.attempt, wid=run.wid, group=run.group, outcome=outcome,
                                          detail=detail, return_slot=return_slot))
        self.collect()
        return [1 if finished else 0]

    def complete(self, rid: str) -> list[Any]:
        """Stream a held request's remaining tokens and finish it as done."""
        run = self.run_of(rid)
        remaining = int(self.r.hget(keys.request(rid), "mt") or 0) - run.next_index
        if remaining > 0:
            assert self.append(run, remaining)[0] == 1, f"{rid} was fenced"
        return self.finish(run)

    def stop_after(self, rid: str, tokens: int) -> list[Any]:
        """Stream `tokens` of a held request, then end it there (a stop string): what its run reserved beyond
        them is given back."""
        run = self.run_of(rid)
        self.append(run, tokens)
        return self.finish(run, detail="stop")

    def heartbeat(self, wid: str) -> list[str]:
        """Renew the worker and the leases of the runs it holds; returns the runs it no longer owns.
        A worker that had lapsed (the sweep retires the worker of a lapsed lease) offers its free
        slots again, as a real worker does."""
        held = [f"{run.rid}|{run.attempt}" for run in self.runs if run.wid == wid]
        rejoin, lost = run_sync(self.t.heartbeat(self.workers[wid], wid, held, lease_ms=self._worker_lease(wid)))
        self._unrecord_lease(wid)
        if rejoin:
            self._offer_slots(wid, self.slots[wid] - len(held), held)
        return lost

    def handback(self, run: Run, reason: str = "worker_shutdown", return_slot: bool = True) -> list[Any]:
        self.runs.remove(run)
        stopped = run_sync(self.t.hand_back(run.rid, run.attempt, wid=run.wid, group=run.group, reason=reason,
                                            return_slot=return_slot))
        self.collect()
        return [1 if stopped else 0]

    # -- the API's and the scheduler's side ------------------------------------------------------
    def submit(self, sid: str, *, tenant: str = "t", group: str = "default", priority: int = 5,
               max_tokens: int = 10, prompt: str = "x" * 40, rid: str | None = None, deadline_ms: int | None = None,
               fail_on_miss: bool = False, boost_cap: int | None = None) -> str:
        if rid is None:
            self._rids += 1
            rid = f"r{self._rids}"
        rid = keys.bucket_of_session(sid) + rid  # request ids carry their session's bucket
        self._group(group)
        req = NewRequest(session_id=sid, max_tokens=max_tokens, priority=priority, tenant=tenant, group=group,
                         prompt=prompt, request_id=rid, deadline_ms=deadline_ms, fail_on_deadline_miss=fail_on_miss,
                         boost_cap=boost_cap)
        outcome, _ = run_sync(self.t.submit(req))
        assert outcome == "ok", outcome
        self.collect()
        return rid

    def cancel(self, rid: str) -> list[Any]:
        reply = run_sync(self.t.cancel(rid))
        self.collect()
        return reply

    def sweep(self) -> tuple[int, int, int, float, float]:
        """Every group's sweep (as the scheduler's loops do); the sums, and the earliest wake-up."""
        totals, wakes, now = [0, 0, 0], [], 0.0
        for group in sorted(self.r.smembers(keys.GROUPS)):
            result = run_sync(self.t.sweep(group))
            totals = [totals[0] + result.lapsed, totals[1] + result.promoted, totals[2] + result.started]
            if result.next_wake_ms >= 0:
                wakes.append(result.next_wake_ms)
            now = result.now_ms
        self.collect()
        return totals[0], totals[1], totals[2], min(wakes) if wakes else -1.0, now

    def set_preemptions(self, rid: str, count: int) -> None:
        """Pretend a running request was preempted `count` times (its run record keeps the count)."""
        run = self.run_of(rid)
        key = f"{rid}|{run.attempt}"
        record = json.loads(self.r.hget(keys.group_key(run.group, "ri"), key))
        record["pc"] = count
        self.r.hset(keys.group_key(run.group, "ri"), key, json.dumps(record))

    # -- inspection ------------------------------------------------------------------------------
    def req(self, rid: str) -> dict[str, str]:
        return self.r.hgetall(keys.request(rid))

    def status(self, rid: str) -> str:
        return self.r.hget(keys.request(rid), "st") or "missing"

    def log(self, sid: str) -> list[Entry]:
        """The session's log as its readers see it (sessions/events.py)."""
        return [Entry(e.seq, e.name, e.request_id, json.loads(e.data))
                for e in map(Event.parse, self.r.lrange(keys.session_log(sid), 0, -1))]

    def events(self, sid: str, rid: str) -> list[Entry]:
        return [e for e in self.log(sid) if e.rid == rid]

    def token_indices(self, sid: str, rid: str) -> list[int]:
        return [e.data["index"] for e in self.events(sid, rid) if e.event == "token"]

    def waiting_rid(self, sid: str, group: str = "default") -> str | None:
        """The request the group's ready spec of session `sid` names (its first stored value: see
        scheduler/lua/includes/ready_specs.lua), or None when the session is not ready there."""
        raw = self.r.hget(keys.group_key(group, "rq"), sid)
        return raw.split("|", 1)[0] if raw is not None else None

    def vtc(self, tenant: str, group: str = "default") -> float:
        return float(self.r.hget(keys.group_key(group, "vtc"), tenant) or 0)

    def running(self, group: str = "default") -> list[str]:
        """Request ids of the group's running runs."""
        return [key.rpartition("|")[0] for key in self.r.zrange(keys.group_key(group, "run"), 0, -1)]

    def pending_preemptions(self, group: str = "default") -> int:
        return int(self.r.zcard(keys.group_key(group, "pre")))

    def dispatched_rids(self) -> list[str]:
        return [run.rid for run in self.dispatched]


class _Sync:
    """A synchronous client seen through awaitable calls, for helpers written for the async clients."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

        return call


def tickets(h: Harness, group: str = "default") -> int:
    """The group's free slots (tickets in its idle list)."""
    return int(h.r.llen(keys.group_key(group, "idle")))


def held_tickets(h: Harness, group: str = "default") -> set[str]:
    """The attempts that hold a slot (each gives its ticket back once)."""
    return set(h.r.hkeys(keys.group_key(group, "tk")))
