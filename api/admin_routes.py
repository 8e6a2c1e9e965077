"""Keys, tenant weights, group quotas and statistics (admin key required when auth is on)."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Request

from sluicegate.api.auth import Principal, require_admin
from sluicegate.api.errors import ApiError
from sluicegate.api.responses import JSON
from sluicegate.api.schemas import NAME_PATTERN, KeyBody, QuotaBody, WeightBody
from sluicegate.api.services import principal, services

router = APIRouter(prefix="/v1/admin")
NAME = re.compile(NAME_PATTERN)


def check_name(kind: str, name: str) -> None:
    if not NAME.match(name):
        raise ApiError(422, f"{kind}: 1-64 characters of A-Z a-z 0-9 . _ -")


@router.post("/keys", status_code=201)
async def create_key(body: KeyBody, request: Request, who: Principal = Depends(principal)):
    require_admin(who)
    return JSON(await services(request).keyring.create(body.tenant), status_code=201)


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request, who: Principal = Depends(principal)):
    require_admin(who)
    if not await services(request).keyring.revoke(key_id):
        raise ApiError(404, f"no key {key_id!r}")
    return JSON({"key_id": key_id, "revoked": True})


@router.get("/tenants")
async def list_tenants(request: Request, who: Principal = Depends(principal)):
    require_admin(who)
    return JSON({"tenants": await services(request).tuning.tenants()})


@router.put("/tenants/{tenant}")
async def set_tenant(tenant: str, body: WeightBody, request: Request, who: Principal = Depends(principal)):
    require_admin(who)
    check_name("tenant", tenant)
    await services(request).tuning.set_weight(tenant, body.weight)
    return JSON({"tenant": tenant, "weight": body.weight})


@router.get("/groups")
async def list_groups(request: Request, who: Principal = Depends(principal)):
    require_admin(who)
    tuning = services(request).tuning
    return JSON({"groups": [{"group": g, "quota": await tuning.quota(g)} for g in await tuning.groups()]})


@router.put("/groups/{group}")
async def set_group(group: str, body: QuotaBody, request: Request, who: Principal = Depends(principal)):
    require_admin(who)
    check_name("group", group)
    quota = await services(request).tuning.set_quota(group, body.model_dump(exclude_unset=True))
    return JSON({"group": group, "quota": quota})


@router.get("/stats")
async def stats(request: Request, who: Principal = Depends(principal)):
    require_admin(who)
    svc = services(request)
    data = await svc.tuning.stats()
    data["api_process"] = {"open_streams": svc.open_streams, "subscribed_sessions": svc.hub.subscribed_sessions}
    return JSON(data)
