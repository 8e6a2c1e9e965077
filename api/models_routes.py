"""`GET /v1/models`: what a chat call can name as its `model` right now, in OpenAI's shape.

A group is listed while it has a live worker, under the model it declared or, when it declared none,
under its own name (a chat call's `model` may name a group), unless another group serves a model of
that name: the call would go there. `created` is the time of the answer, as vLLM gives it: Sluicegate
keeps no creation time for a model.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request

from sluicegate.api.auth import Principal
from sluicegate.api.errors import ApiError
from sluicegate.api.responses import JSON
from sluicegate.api.services import principal, services
from sluicegate.sessions.registry import group_models

router = APIRouter()
SERVED_TTL = 1.0  # seconds a listing is reused


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"the model {model[:256]!r} does not exist or no group serves it (GET /v1/models lists them)",
                    "model_not_found", "model_not_found")


async def served_models(request: Request) -> list[dict[str, Any]]:
    """The listing, kept a second per process: any caller may ask, and it reads every worker's liveness."""
    svc = services(request)
    cached = svc.directory.served
    if cached is not None and time.monotonic() - cached[0] < SERVED_TTL:
        return cached[1]
    live = {w["group"] for w in await svc.tuning.workers()}
    named = await group_models(svc.redis)
    created = int(time.time())
    models = set(named.values())  # a model routes before a group's name (api/directory.py group_for)
    ids = sorted({named.get(group, group) for group in live
                  if group in named or group not in models})
    listing = [{"id": i, "object": "model", "created": created, "owned_by": "sluicegate"} for i in ids]
    svc.directory.served = (time.monotonic(), listing)
    return listing


@router.get("/v1/models")
async def list_models(request: Request, who: Principal = Depends(principal)):
    return JSON({"object": "list", "data": await served_models(request)})


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request, who: Principal = Depends(principal)):
    for entry in await served_models(request):
        if entry["id"] == model:
            return JSON(entry)
    raise model_not_found(model)
