"""Per-tenant guardrails as operators set them (`PUT /v1/admin/tenants/{t}`): how they are stored.

One hash (sessions/keys.py TENANT_LIMITS) whose fields are `<tenant>:<limit>`: a tenant name has no
`:`, so the field is unambiguous; one field per limit makes each change a single HSET or HDEL (two
operators changing different limits of one tenant cannot undo each other), and one tenant's limits
are one HMGET. A limit at its default is not stored: a tenant nobody limited has no field at all.

Setting `max_queued` seeds the tenant's admission set with the requests it already has queued or
running (scheduler/tenant_requests.py): the limit counts them from the start, not only later submits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sluicegate.scheduler.tenant_requests import seed_active
from sluicegate.sessions import keys
from sluicegate.sessions.connect import text

MAX_PRIORITY = 9


@dataclass(frozen=True)
class TenantLimits:
    max_priority: int = MAX_PRIORITY  # a submit above it is refused (403 priority_not_allowed)
    max_queued: int | None = None  # requests queued or running at once; None: unlimited
    max_streams: int | None = None  # open SSE streams at once; None: unlimited

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


DEFAULTS = TenantLimits()
LIMIT_NAMES = tuple(DEFAULTS.as_dict())


def _field(tenant: str, name: str) -> str:
    return f"{tenant}:{name}"


def _parse(values: dict[str, Any]) -> TenantLimits:
    return TenantLimits(**{name: int(text(v)) for name, v in values.items() if v is not None})


async def read_limits(redis: Any, tenant: str) -> TenantLimits:
    values = await redis.hmget(keys.TENANT_LIMITS, [_field(tenant, n) for n in LIMIT_NAMES])
    return _parse(dict(zip(LIMIT_NAMES, values, strict=True)))


async def all_limits(redis: Any) -> dict[str, TenantLimits]:
    """Every tenant with a limit set (an admin listing: one HGETALL)."""
    found: dict[str, dict[str, Any]] = {}
    for field, value in (await redis.hgetall(keys.TENANT_LIMITS)).items():
        tenant, _, name = text(field).rpartition(":")
        if name in LIMIT_NAMES:
            found.setdefault(tenant, {})[name] = value
    return {tenant: _parse(values) for tenant, values in found.items()}


async def write_limits(redis: Any, tenant: str, changes: dict[str, int | None]) -> TenantLimits:
    """Set the given limits; one given as None, or at its default, goes back to the default."""
    defaults = DEFAULTS.as_dict()
    to_set = {_field(tenant, k): v for k, v in changes.items() if v is not None and v != defaults[k]}
    to_clear = [_field(tenant, k) for k, v in changes.items() if v is None or v == defaults[k]]
    if to_set:
        await redis.hset(keys.TENANT_LIMITS, mapping=to_set)
    if to_clear:
        await redis.hdel(keys.TENANT_LIMITS, *to_clear)
    if changes.get("max_queued") is not None:  # after the write: a submit admitted as unlimited before it is found
        await seed_active(redis, tenant)
    return await read_limits(redis, tenant)
