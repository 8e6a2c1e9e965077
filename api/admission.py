"""`max_queued`: how many requests a tenant may have queued or running at once, across every API process.

Each request of a limited tenant takes a place in one zset (sessions/keys.py `tenant_active`) before
its submit, in one transaction (ZADD, ZCARD): over the limit, the place is given back and the submit
refused, so the count never exceeds the limit (two racing for the last place may both be refused:
never both admitted). A submit that stored nothing gives its place back: refused by its session's
owner or group, or by the store (full, read-only, down: api/requests_routes.py). One whose answer was
lost (MaybeStored: it may or may not have stored the request) keeps it until a check finds no request
behind it, as does one whose give-back failed too (freed once SUBMIT_SECONDS old).

Nothing on a request's way to its end writes here (no worker or scheduler step knows of tenants'
limits, and on a cluster the tenant's key is on another shard than the request). Places are given back
lazily instead: when a submit finds the set full, the members are checked (one pipelined status read
each) and the ended or expired ones removed. A check that frees nothing is not repeated for a second,
so a tenant flooding at its limit costs one ZADD + ZCARD per refusal, not a scan. Cost: one check per
`max_queued` admissions in the steady state.

The set starts with the tenant's live requests, seeded when the limit is set (scheduler/limits.py), and
the check seeds it again first (scheduler/tenant_requests.py; at most every SEED_SECONDS): a request
admitted as unlimited by a process whose cached limits had not caught up yet is counted from the first
check after it. A tenant with no `max_queued` costs nothing here (no command on its submits).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sluicegate.scheduler.tenant_requests import KEEP_SECONDS, seed_active
from sluicegate.sessions import keys
from sluicegate.sessions.connect import text

RECHECK_SECONDS = 1.0  # a full set whose check freed nothing is not checked again sooner
# A full set's check seeds it at most this often per tenant and process: the seed reads every live request
# of the tenant (one queue read a session), and a tenant refused at its limit would repeat it each second.
# The requests it is for (admitted while cached limits lagged, a few seconds) stay live until counted.
SEED_SECONDS = 30.0
SUBMIT_SECONDS = 30.0  # a place older than this without its request belongs to a submit that failed


class QueuedLimit:
    def __init__(self, redis: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.clock = clock
        self.checked: dict[str, float] = {}  # tenant -> when a check of its full set last freed nothing
        self.seeded: dict[str, float] = {}  # tenant -> when a check last seeded its set

    async def take(self, tenant: str, request_id: str, limit: int) -> bool:
        """Take a place for `request_id`; False when the tenant has `limit` requests queued or running."""
        if await self._add(tenant, request_id, limit):
            return True
        if self.clock() - self.checked.get(tenant, float("-inf")) < RECHECK_SECONDS:
            return False
        if not await self._forget_ended(tenant):
            self.checked[tenant] = self.clock()
            return False
        return await self._add(tenant, request_id, limit)

    async def give_back(self, tenant: str, request_id: str) -> None:
        await self.redis.zrem(keys.tenant_active(tenant), request_id)

    async def count(self, tenant: str) -> int:
        return int(await self.redis.zcard(keys.tenant_active(tenant)))

    async def _add(self, tenant: str, request_id: str, limit: int) -> bool:
        key = keys.tenant_active(tenant)
        async with self.redis.pipeline(transaction=True) as tx:
            tx.zadd(key, {request_id: time.time()})
            tx.zcard(key)
            tx.expire(key, KEEP_SECONDS)
            _, size, _ = await tx.execute()
        if int(size) <= limit:
            return True
        await self.redis.zrem(key, request_id)
        return False

    async def _forget_ended(self, tenant: str) -> bool:
        """Count the tenant's live requests the set misses (seed, at most every SEED_SECONDS), then remove
        the members that ended or expired; True when any was."""
        if self.clock() - self.seeded.get(tenant, float("-inf")) >= SEED_SECONDS:
            self.seeded[tenant] = self.clock()
            await seed_active(self.redis, tenant)
        key = keys.tenant_active(tenant)
        members = [(text(m), float(at)) for m, at in await self.redis.zrange(key, 0, -1, withscores=True)]
        if not members:
            return False
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid, _ in members:
                pipe.hget(keys.request(rid), "st")
            statuses = await pipe.execute()
        # No request yet: expired, or a submit still on its way (its place was taken first): only an
        # old one is gone.
        settled = time.time() - SUBMIT_SECONDS
        ended = [rid for (rid, at), status in zip(members, statuses, strict=True)
                 if (at < settled if status is None else text(status) in keys.TERMINAL_STATUSES)]
        if ended:
            await self.redis.zrem(key, *ended)
        return bool(ended)
