"""The audit log: every admin change (keys, weights, tenant limits, groups: model, quotas, deadlines), newest first,
in one capped list (`sg:audit`, the newest AUDIT_MAX entries), shown by `GET /v1/admin/audit`.

An entry is written after its change succeeded, with what the admin API showed of the target before
and after. Admin calls are rare, so one global key is fine on a cluster too."""

from __future__ import annotations

import time
from typing import Any

import orjson

from sluicegate.api.services import Services
from sluicegate.scheduler.deadlines import read_deadlines
from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.registry import group_models

AUDIT_MAX = 10_000


async def record(svc: Services, action: str, target: str, before: Any, after: Any) -> None:
    """Append one change. `key_id` names the caller's key: "admin" (the admin key) with auth on, null
    with auth off (anyone on loopback is admin then)."""
    entry = {"at": round(time.time(), 3), "key_id": "admin" if svc.settings.auth_enabled else None,
             "action": action, "target": target, "before": before, "after": after}
    await svc.redis.lpush(keys.AUDIT, orjson.dumps(entry))
    await svc.redis.ltrim(keys.AUDIT, 0, AUDIT_MAX - 1)


async def entries(svc: Services, limit: int) -> list[dict[str, Any]]:
    return [orjson.loads(text(raw)) for raw in await svc.redis.lrange(keys.AUDIT, 0, limit - 1)]


async def key_state(svc: Services, key_id: str) -> dict[str, Any] | None:
    """A key as GET /v1/admin/keys lists it (never the key)."""
    return next((k for k in await svc.keyring.listing() if k["key_id"] == key_id), None)


async def group_state(svc: Services, group: str) -> dict[str, Any]:
    """A group's model, quota and default deadlines per class, as GET /v1/admin/groups shows them."""
    deadlines = await read_deadlines(svc.redis, group)
    return {"model": (await group_models(svc.redis)).get(group), "quota": await svc.tuning.quota(group),
            "deadlines_ms": {str(cls): ms for cls, ms in sorted(deadlines.items())}}
