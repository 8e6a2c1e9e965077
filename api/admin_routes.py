"""Keys, tenant weights, group quotas and statistics (admin key required when auth is on: the router's
dependency checks it before anything else, so a tenant key gets 403 whatever its body)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from sluicegate.api import audit
from sluicegate.api.errors import ApiError
from sluicegate.api.responses import JSON
from sluicegate.api.schemas import GroupBody, KeyBody, TenantBody
from sluicegate.api.services import Services, admin, services
from sluicegate.scheduler.deadlines import read_deadlines, write_deadlines
from sluicegate.sessions.keys import NAME
from sluicegate.sessions.registry import ModelConflict, declare_group, forget_group_model, group_models

router = APIRouter(prefix="/v1/admin", dependencies=[Depends(admin)])


def check_name(kind: str, name: str) -> None:
    if not NAME.fullmatch(name):
        raise ApiError(422, f"{kind}: 1-64 characters of A-Z a-z 0-9 . _ -")


@router.post("/keys", status_code=201)
async def create_key(body: KeyBody, request: Request):
    created = await services(request).keyring.create(body.tenant, body.expires_in)
    await audit.record(services(request), "key.create", created["key_id"], None,
                       {k: v for k, v in created.items() if k != "key"})
    return JSON(created, status_code=201)


@router.get("/keys")
async def list_keys(request: Request):
    """Every key's id, tenant, creation, last use (to about a minute) and expiry; never the key."""
    return JSON({"keys": await services(request).keyring.listing()})


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request):
    before = await audit.key_state(services(request), key_id)
    if not await services(request).keyring.revoke(key_id):
        raise ApiError(404, f"no key {key_id!r}")
    await audit.record(services(request), "key.revoke", key_id, before, None)
    return JSON({"key_id": key_id, "revoked": True})


@router.get("/tenants")
async def list_tenants(request: Request):
    return JSON({"tenants": await services(request).tuning.tenants()})


@router.put("/tenants/{tenant}")
async def set_tenant(tenant: str, body: TenantBody, request: Request):
    """The weight (fair share) and the guardrails (api/guardrails.py); fields left out are kept."""
    check_name("tenant", tenant)
    svc = services(request)
    before = await svc.tuning.tenant(tenant)
    fields = body.model_dump(exclude_unset=True)
    weight = fields.pop("weight", None)
    if weight is not None:
        await svc.tuning.set_weight(tenant, weight)
    if fields:
        await svc.tuning.set_limits(tenant, fields)
        svc.guardrails.invalidate(tenant)  # this process applies them at once; the others within seconds
    after = await svc.tuning.tenant(tenant)
    await audit.record(svc, "tenant.update", tenant, before, after)
    return JSON(after)


@router.get("/groups")
async def list_groups(request: Request):
    svc = services(request)
    models = await group_models(svc.redis)
    return JSON({"groups": [{"group": g, "model": models.get(g), "quota": await svc.tuning.quota(g),
                             "deadlines_ms": deadlines_view(await read_deadlines(svc.redis, g))}
                            for g in await svc.tuning.groups()]})


def deadlines_view(deadlines: dict[int, int]) -> dict[str, int]:
    return {str(cls): ms for cls, ms in sorted(deadlines.items())}


@router.put("/groups/{group}")
async def set_group(group: str, body: GroupBody, request: Request):
    """Declares the group; `model` names the model it serves (409 `model_conflict` when another group
    serves it: nothing is changed then), null forgets it; the quota fields as before."""
    check_name("group", group)
    svc = services(request)
    before = await audit.group_state(svc, group)
    fields = body.model_dump(exclude_unset=True)
    model = fields.pop("model", None)
    deadlines = fields.pop("deadlines_ms", None)
    try:
        if "model" in body.model_fields_set and model is None:
            await forget_group_model(svc.redis, group)
        await declare_group(svc.redis, group, model)
    except ModelConflict as conflict:
        raise ApiError(409, str(conflict), "model_conflict") from None
    finally:
        svc.directory.invalidate()  # this process routes by the change at once; the others within seconds
    quota = await svc.tuning.set_quota(group, fields)
    if deadlines is not None:
        await write_deadlines(svc.redis, group, {int(cls): ms for cls, ms in deadlines.items()})
        svc.directory.invalidate()
    await audit.record(svc, "group.update", group, before, await audit.group_state(svc, group))
    return JSON({"group": group, "model": (await group_models(svc.redis)).get(group), "quota": quota,
                 "deadlines_ms": deadlines_view(await read_deadlines(svc.redis, group))})


@router.get("/stats")
async def stats(request: Request):
    return JSON(await stats_document(services(request)))


async def stats_document(svc: Services) -> dict[str, Any]:
    """The stats JSON, also sent each second by the dashboard's stream (api/dashboard_routes.py)."""
    data = await svc.tuning.stats()
    data["api_process"] = {"open_streams": svc.open_streams, "subscribed_sessions": svc.hub.subscribed_sessions,
                           "open_streams_by_tenant": dict(svc.guardrails.streams)}
    return data
