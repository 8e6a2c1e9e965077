"""The audit log as the admin API writes and shows it (`GET /v1/admin/audit`); the store and a group's audited
state are scheduler/audit_log.py's, shared with `serve --config`.

An entry is written after its change succeeded, with what the admin API showed of the target before
and after."""

from __future__ import annotations

from typing import Any

from sluicegate.api.services import Services
from sluicegate.scheduler import audit_log
from sluicegate.scheduler.audit_log import AUDIT_MAX


async def record(svc: Services, action: str, target: str, before: Any, after: Any) -> None:
    """Append one change. `key_id` names the caller's key: "admin" (the admin key) with auth on, null
    with auth off (anyone on loopback is admin then)."""
    await audit_log.append(svc.redis, "admin" if svc.settings.auth_enabled else None, action, target, before, after,
                           cap=AUDIT_MAX)


async def entries(svc: Services, limit: int) -> list[dict[str, Any]]:
    return await audit_log.entries(svc.redis, limit)


async def key_state(svc: Services, key_id: str) -> dict[str, Any] | None:
    """A key as GET /v1/admin/keys lists it (never the key)."""
    return next((k for k in await svc.keyring.listing() if k["key_id"] == key_id), None)


async def group_state(svc: Services, group: str) -> dict[str, Any]:
    """A group's model, quota and default deadlines per class, as GET /v1/admin/groups shows them."""
    return await audit_log.group_state(svc.redis, group)
