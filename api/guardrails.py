"""Tenant guardrails on the request path: `max_priority` and `max_queued` on a submit, `max_streams` on
an SSE stream.

They bind tenant keys (auth on). The admin key, and every caller when auth is off, is the operator
and is not limited; but a request the admin key submits for a tenant is that tenant's, and takes a place
among its `max_queued` (never refused), so the tenant's own submits count it from the start. Limits are
stored by scheduler/limits.py; every submit of a tenant key needs them, so each tenant's limits are
cached here for `ttl` seconds (a change made through this process applies at once, one made through
another within `ttl`). The admin key may submit for any number of tenant names: the cache, in the order
its entries were loaded, drops the stale ones at its front as it adds one, and holds MAX_CACHED_TENANTS at
most. Checks run before anything is stored.

Queued requests are counted in Redis, fleet-wide (api/admission.py). Open streams are counted in this
API process (no Redis write per stream, nothing to leak when a
process dies): with N API processes behind a balancer a tenant can hold up to N x max_streams.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from sluicegate.api.admission import QueuedLimit
from sluicegate.api.auth import Principal
from sluicegate.api.errors import ApiError
from sluicegate.scheduler.limits import MAX_PRIORITY, TenantLimits, read_limits
from sluicegate.scheduler.tenant_requests import KEEP_SECONDS
from sluicegate.sessions import keys

STREAM_RETRY_AFTER = 5  # seconds: streams end with their requests; sooner would mostly be refused again
QUEUED_RETRY_AFTER = 1  # seconds: a place frees as soon as one of the tenant's requests ends
MAX_CACHED_TENANTS = 4096  # tenants whose limits one API process caches at most (the oldest loaded go first)


def never_admitted(tenant: str, what: str, limit: str, retry_after: int) -> ApiError:
    """A limit of 0 admits nothing until an operator raises it: the contract's 429 `tenant_limit` with its
    Retry-After (a client that waits is admitted once the limit is raised, within the limits' cache), whose
    message says so rather than telling the client to wait for a place of its own to free."""
    return ApiError(429, f"tenant {tenant!r} may not {what}: its {limit} is 0 (until an operator raises it)",
                    "tenant_limit", "tenant_limit", headers={"Retry-After": str(retry_after)})


class Guardrails:
    def __init__(self, redis: Any, *, ttl: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.ttl = ttl
        self.clock = clock
        # tenant -> (loaded at, limits), oldest loaded first (_remember)
        self.cached: OrderedDict[str, tuple[float, TenantLimits]] = OrderedDict()
        self.streams: dict[str, int] = {}  # tenant -> SSE streams open in this process
        self.queued = QueuedLimit(redis, clock=clock)

    async def limits(self, tenant: str) -> TenantLimits:
        hit = self.cached.get(tenant)
        now = self.clock()
        if hit is not None and now - hit[0] <= self.ttl:
            return hit[1]
        limits = await read_limits(self.redis, tenant)
        self._remember(tenant, now, limits)
        return limits

    def _remember(self, tenant: str, loaded: float, limits: TenantLimits) -> None:
        """Cache `tenant`'s limits as the newest entry, and drop from the front the entries gone stale or past
        MAX_CACHED_TENANTS: an entry is dropped at most once per load, so the hot path stays O(1) amortized."""
        self.cached[tenant] = (loaded, limits)
        self.cached.move_to_end(tenant)
        while len(self.cached) > MAX_CACHED_TENANTS or (
                self.cached and loaded - next(iter(self.cached.values()))[0] > self.ttl):
            self.cached.popitem(last=False)

    def invalidate(self, tenant: str | None = None) -> None:
        """Forget cached limits (this process changed them): the next check reads them again."""
        if tenant is None:
            self.cached.clear()
        else:
            self.cached.pop(tenant, None)

    async def check_priority(self, who: Principal, priority: int) -> int | None:
        """403 above the tenant's max_priority; else that cap when it binds (below the highest class): a
        deadline may not raise the request past it either (scheduler/lua/sweep.lua)."""
        if who.admin or who.tenant is None:
            return None
        allowed = (await self.limits(who.tenant)).max_priority
        if priority > allowed:
            raise ApiError(403, f"priority {priority} is above tenant {who.tenant!r}'s max_priority {allowed}",
                           "priority_not_allowed", "priority_not_allowed")
        return allowed if allowed < MAX_PRIORITY else None

    async def take_place(self, who: Principal, tenant: str | None,
                         request_id: str) -> Callable[[], Awaitable[None]] | None:
        """A place among `tenant`'s `max_queued` requests for a request of it about to be submitted, or 429
        `tenant_limit` (saying so when max_queued is 0: no place of its own will free); the admin's request
        takes one too, and is never refused (tenant None: nothing to count, as with auth off). Returns what
        gives the place back when the submit stores nothing (None: the tenant is not limited)."""
        if tenant is None:
            return None
        allowed = (await self.limits(tenant)).max_queued
        if allowed is None:
            return None
        if allowed == 0 and not who.admin:
            raise never_admitted(tenant, "submit requests", "max_queued", QUEUED_RETRY_AFTER)
        if who.admin:
            await self._record_place(tenant, request_id, allowed)
        elif not await self.queued.take(tenant, request_id, allowed):
            raise ApiError(429, f"tenant {tenant!r} has {allowed} requests queued or running (its max_queued); "
                                "submit again when one ends", "tenant_limit", "tenant_limit",
                           headers={"Retry-After": str(QUEUED_RETRY_AFTER)})
        return lambda: self.queued.give_back(tenant, request_id)

    async def _record_place(self, tenant: str, request_id: str, allowed: int) -> None:
        """The admin's request takes a place, past the limit when the set is full: a plain take first, so
        that a full set is checked (its ended requests removed, as for a tenant's submit) and does not grow
        without end when only the admin submits for the tenant."""
        if await self.queued.take(tenant, request_id, allowed):
            return
        key = keys.tenant_active(tenant)  # api/admission.py's set
        async with self.redis.pipeline(transaction=True) as tx:
            tx.zadd(key, {request_id: time.time()})
            tx.expire(key, KEEP_SECONDS)
            await tx.execute()

    async def open_stream(self, who: Principal) -> Callable[[], None]:
        """Count one more stream of the caller's tenant, or 429 `tenant_limit` when it holds
        `max_streams` already (saying so when max_streams is 0). Returns the release, to
        call exactly once when the stream ends (it does nothing the second time)."""
        tenant = who.tenant
        if who.admin or tenant is None:
            return lambda: None
        allowed = (await self.limits(tenant)).max_streams
        if allowed == 0:
            raise never_admitted(tenant, "open streams", "max_streams", STREAM_RETRY_AFTER)
        # no await between the check and the count: concurrent opens cannot both take the last place
        if allowed is not None and self.streams.get(tenant, 0) >= allowed:
            raise ApiError(429, f"tenant {tenant!r} has {allowed} streams open (its max_streams); close one first",
                           "tenant_limit", "tenant_limit", headers={"Retry-After": str(STREAM_RETRY_AFTER)})
        self.streams[tenant] = self.streams.get(tenant, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.streams.get(tenant, 1) - 1
            if left > 0:
                self.streams[tenant] = left
            else:
                self.streams.pop(tenant, None)

        return release
