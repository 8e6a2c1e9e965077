"""Operators' reads: the audit log and usage for chargeback (admin key required when auth is on), and
readiness (`/readyz`: Redis answers, the function library is loaded and no server may evict keys; `/healthz`
stays liveness)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from sluicegate.api import audit
from sluicegate.api.errors import ApiError
from sluicegate.api.responses import JSON
from sluicegate.api.services import admin, services
from sluicegate.sessions import usage
from sluicegate.sessions.connect import UNAVAILABLE
from sluicegate.sessions.library import digest
from sluicegate.sessions.store_policy import eviction_problems

router = APIRouter()


@router.get("/v1/admin/audit", dependencies=[Depends(admin)])
async def audit_log(request: Request, limit: int = Query(100, ge=1, le=audit.AUDIT_MAX)):
    """Admin changes, newest first: {at, key_id, action, target, before, after} (api/audit.py)."""
    return JSON({"entries": await audit.entries(services(request), limit)})


def parse_since(since: str | None) -> float:
    """Unix seconds or an ISO 8601 time (no zone: UTC); default 24 hours ago."""
    if not since:
        return time.time() - 86400
    try:
        seconds = float(since)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):  # "nan", "inf", "1e400": no hour to start from
            raise ApiError(422, "since: a finite number of Unix seconds, or an ISO 8601 time")
        return seconds
    try:
        moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "since: Unix seconds or an ISO 8601 time (e.g. 2026-12-01T00:00:00Z)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@router.get("/v1/admin/usage", dependencies=[Depends(admin)])
async def usage_report(request: Request, tenant: str = "", group: str = "", since: str = ""):
    """Requests, input and output tokens per tenant, group and hour, from `since` (hours are kept 35 days;
    sessions/usage.py). Each row's `hour` is the Unix time its hour starts."""
    start = parse_since(since)
    rows = await usage.usage(services(request).redis, since=start, tenant=tenant or None, group=group or None)
    for row in rows:
        row["hour_utc"] = datetime.fromtimestamp(row["hour"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    totals = {k: sum(r[k] for r in rows) for k in ("requests", "input_tokens", "output_tokens")}
    return JSON({"since": start, "usage": rows, "totals": totals})


async def library_loaded(redis: Any) -> bool:
    """The function library of this version is on the server (on every master of a cluster)."""
    name = f"sluicegate_{digest()}"
    if isinstance(redis, RedisCluster):
        # One call per primary: with target_nodes=PRIMARIES redis-py answers a dict of replies only when there
        # are several nodes, and the bare reply for a cluster of one primary.
        for node in redis.get_primaries():
            if not await redis.execute_command("FUNCTION", "LIST", "LIBRARYNAME", name, target_nodes=node):
                return False
        return True
    return bool(await redis.execute_command("FUNCTION", "LIST", "LIBRARYNAME", name))


@router.head("/readyz", include_in_schema=False)  # a load balancer's check; one operation id in the OpenAPI document
@router.get("/readyz")
async def readyz(request: Request):
    """200 when Redis answers, the function library is loaded and no server's maxmemory-policy may evict
    keys (accepted requests would be lost: sessions/store_policy.py), else 503 with the reason. A library
    found missing (a flushed or failed-over server) is loaded here, as the next call would load it."""
    svc = services(request)
    try:
        await svc.redis.ping()
    except (*UNAVAILABLE, RedisError) as error:
        return JSON({"status": "unavailable", "reason": f"redis does not answer: {error}"}, status_code=503,
                    headers={"Retry-After": "1"})
    try:
        if not await library_loaded(svc.redis):
            await svc.store.scripts.load()
            if not await library_loaded(svc.redis):
                raise RedisError("still missing after FUNCTION LOAD")
    except (*UNAVAILABLE, RedisError) as error:
        return JSON({"status": "unavailable", "reason": f"function library not loaded: {error}"}, status_code=503,
                    headers={"Retry-After": "1"})
    problems = await eviction_problems(svc.redis)  # asked each time: a policy fixed at runtime counts at once
    if problems:
        return JSON({"status": "unavailable", "reason": "; ".join(problems)}, status_code=503,
                    headers={"Retry-After": "1"})
    return JSON({"status": "ready"})
