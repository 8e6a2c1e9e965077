"""Submit, inspect and cancel requests."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from sluicegate.api.auth import Principal
from sluicegate.api.errors import ApiError
from sluicegate.api.responses import JSON
from sluicegate.api.schemas import SESSION_PATTERN, SubmitBody
from sluicegate.api.services import principal, services
from sluicegate.api.views import request_view
from sluicegate.sessions.requests import NewRequest

router = APIRouter()


def check_session_id(session_id: str) -> None:
    if not SESSION_PATTERN.fullmatch(session_id):
        raise ApiError(422, "session_id: 1-128 characters of A-Z a-z 0-9 . _ : @ -")


async def submit_request(request: Request, who: Principal, new: NewRequest) -> dict[str, str | int]:
    svc = services(request)
    try:
        new.input_text.encode()
    except UnicodeEncodeError:  # e.g. a lone surrogate ("\ud800"), which JSON allows and UTF-8 does not
        raise ApiError(422, "prompt/messages: not valid Unicode text (a lone surrogate?)") from None
    if new.max_tokens > svc.settings.max_tokens_limit:
        raise ApiError(422, f"max_tokens: at most {svc.settings.max_tokens_limit} (--max-tokens-limit)")
    await svc.guardrails.check_priority(who, new.priority)  # before the submit: a refused request stores nothing
    result = await svc.store.submit(new, owner=who.owner)
    if result.outcome == "forbidden":
        raise ApiError(403, f"session {new.session_id!r} belongs to another tenant")
    if result.outcome == "unknown_group":
        raise ApiError(404, f"no group {new.group!r}: declare it (PUT /v1/admin/groups/{new.group}) or start a worker "
                       "serving it", "unknown_group")
    return {"request_id": result.request_id, "session_id": new.session_id, "status": "queued",
            "events_url": f"/v1/requests/{result.request_id}/events", "first_event_id": result.first_event_id}


@router.post("/v1/sessions/{session_id}/requests", status_code=202)
async def submit(session_id: str, body: SubmitBody, request: Request, who: Principal = Depends(principal)):
    check_session_id(session_id)
    new = NewRequest(session_id=session_id, max_tokens=body.max_tokens, priority=int(body.priority),
                     tenant=who.tenant or body.tenant, group=body.group, prompt=body.prompt,
                     messages=[m.model_dump() for m in body.messages] if body.messages else None,
                     params=body.params)
    return JSON(await submit_request(request, who, new), status_code=202)


@router.get("/v1/requests/{request_id}")
async def get_request(request_id: str, request: Request, who: Principal = Depends(principal)):
    fields = await services(request).store.request_fields(request_id)
    if fields is None or (who.tenant and fields.get("tn") != who.tenant):
        raise ApiError(404, f"no request {request_id!r}")
    return JSON(request_view(request_id, fields))


@router.delete("/v1/requests/{request_id}")
async def cancel_request(request_id: str, request: Request, who: Principal = Depends(principal)):
    svc = services(request)
    outcome = await svc.store.cancel(request_id, owner=who.owner)
    if outcome[0] in ("missing", "forbidden"):
        raise ApiError(404, f"no request {request_id!r}")
    if outcome[0] == "terminal":
        raise ApiError(409, f"request {request_id!r} already ended ({outcome[1]})")
    fields = await svc.store.request_fields(request_id) or {}
    return JSON(request_view(request_id, fields), status_code=200)
