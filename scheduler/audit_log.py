"""The audit log's store: every admin change (keys, weights, tenant limits, groups: model, quotas, deadlines),
newest first, in one capped list (`sg:audit`, the newest AUDIT_MAX entries).

Two writers share it: the admin API (api/audit.py, after a change succeeded) and `serve --config`, which
declares its groups' models and quotas at every start (key_id "config"). Admin changes are rare, so one
global key is fine on a cluster too."""

from __future__ import annotations

import time
from typing import Any

import orjson
from redis.asyncio import Redis

from sluicegate.scheduler.admin import Tuning
from sluicegate.scheduler.deadlines import read_deadlines
from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.registry import group_models

AUDIT_MAX = 10_000


async def append(client: Redis, key_id: str | None, action: str, target: str, before: Any, after: Any,
                 cap: int = AUDIT_MAX) -> None:
    """One entry {at, key_id, action, target, before, after}; the list keeps the newest `cap`."""
    entry = {"at": round(time.time(), 3), "key_id": key_id, "action": action, "target": target,
             "before": before, "after": after}
    await client.lpush(keys.AUDIT, orjson.dumps(entry))
    await client.ltrim(keys.AUDIT, 0, cap - 1)


async def entries(client: Redis, limit: int) -> list[dict[str, Any]]:
    return [orjson.loads(text(raw)) for raw in await client.lrange(keys.AUDIT, 0, limit - 1)]


async def group_state(client: Redis, group: str) -> dict[str, Any]:
    """A group's model, quota and default deadlines per class, as GET /v1/admin/groups shows them."""
    deadlines = await read_deadlines(client, group)
    return {"model": (await group_models(client)).get(group), "quota": await Tuning(client).quota(group),
            "deadlines_ms": {str(cls): ms for cls, ms in sorted(deadlines.items())}}
