"""Submit, inspect and cancel requests."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace

from fastapi import APIRouter, Depends, Request
from starlette.types import Scope

from sluicegate.api.auth import Principal
from sluicegate.api.callbacks import attach_callback, check_callback
from sluicegate.api.deadline import lift_response_deadline, note_pending_submit
from sluicegate.api.errors import ApiError
from sluicegate.api.output import request_output
from sluicegate.api.responses import JSON
from sluicegate.api.schemas import SESSION_PATTERN, SubmitBody, unsendable, unsendable_value
from sluicegate.api.services import Services, principal, services
from sluicegate.sessions import callbacks, keys
from sluicegate.sessions.connect import store_unavailable, text
from sluicegate.sessions.keys import NAME, NAME_PATTERN
from sluicegate.sessions.requests import MAX_NESTING, NewRequest, TooDeep
from sluicegate.sessions.status import request_view
from sluicegate.sessions.transitions import MaybeStored
from sluicegate.tracing import TRACING, carry_trace

log = logging.getLogger(__name__)
router = APIRouter()
NO_RETRY = {"x-should-retry": "false"}  # as a stored chat request's (api/openai_routes.py): no SDK retries it
OLD_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,62}")  # what an id before the cluster layout may be (migrate's OLD_ID)


class NestedTooDeep(ApiError):
    """A body's params or messages nested deeper than MAX_NESTING (422): api/hot_path.py hands that body to
    FastAPI, whose parser refuses the deepest ones (400) before this check would."""


def content_type(scope: Scope) -> bytes:
    """The body's media type, lower case, without its parameters (charset, ...); b"" when none is given."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""


def is_json(media_type: bytes) -> bool:
    """application/json or a +json type (application/vnd.api+json, ...): what FastAPI reads as JSON."""
    return media_type == b"application/json" or (media_type.startswith(b"application/")
                                                  and media_type.endswith(b"+json"))


async def require_json(request: Request) -> None:
    """A JSON body with any other content type is a 415, unread: a browser's cross-site POST of a form or of
    text/plain skips the CORS preflight, and auth is off by default on loopback (FastAPI's strict_content_type
    would only leave such a body unparsed). The submit's dependency; the chat route calls it."""
    media_type = content_type(request.scope)
    if not is_json(media_type):
        given = repr(media_type.decode("latin-1")[:100]) if media_type else "none"
        raise ApiError(415, f"Content-Type: send application/json (a JSON body); got {given}")


def check_session_id(session_id: str) -> None:
    if not SESSION_PATTERN.fullmatch(session_id):
        raise ApiError(422, "session_id: 1-128 characters of A-Z a-z 0-9 . _ : @ -")


def submit_tenant(who: Principal, body: SubmitBody) -> str:
    """The request's tenant: a tenant key's own, the body's field ignored whatever JSON it holds (null, a
    number, an object); else (auth off, or the admin key submitting for a tenant) the body's, a 422 in
    pydantic's words when it is not a string that is a name."""
    if who.tenant:
        return who.tenant
    if not isinstance(body.tenant, str):
        raise ApiError(422, "tenant: Input should be a valid string")
    if not NAME.fullmatch(body.tenant):
        raise ApiError(422, f"tenant: String should match pattern '{NAME_PATTERN}'")
    return body.tenant


def unknown_group(group: str) -> ApiError:
    return ApiError(404, f"no group {group!r}: declare it (PUT /v1/admin/groups/{group}) or start a worker serving it",
                    "unknown_group")


async def check_group(svc: Services, group: str) -> None:
    """404 `unknown_group` before a tenant's limits count the request: a tenant at its limit must not get a
    retryable 429 for a submit that can never succeed. Cached by the store: a known group costs no round trip."""
    if not await svc.store.known_group(group):
        raise unknown_group(group)


async def note_callback_of_lost(svc: Services, request_id: str, callback: str) -> bool:
    """A callback noted on a request whose submit got no answer (MaybeStored): noted only if the request was
    stored (False when it does not exist); False too when the store fails again."""
    try:
        return await callbacks.attach(svc.redis, request_id, callback)
    except Exception as error:  # the 503 it goes into matters more than why (the store is failing anyway)
        log.warning("noting the callback of %s after a lost submit answer failed: %s: %s", request_id,
                    type(error).__name__, error)
        return False


def maybe_stored(new: NewRequest, noted: bool | None) -> ApiError:
    """The 503 of a submit whose answer was lost twice: not the plain 503 a client retries (that would store it
    a second time). `noted`: whether its callback was noted (None: it had none)."""
    message = (f"the queue store (Redis) did not answer the submit: the request may have been stored and then "
               f"runs. Look at /v1/requests/{new.request_id} before submitting again (404: it was not stored)")
    if noted:  # the request exists, so it was stored
        message += ". It was stored after all: its callback is noted and will be sent when it ends"
    elif noted is not None:
        message += ". Its callback_url was not noted: if the request was stored, poll it (no callback will be sent)"
    return ApiError(503, message, "unavailable", "maybe_stored", {"X-Request-Id": new.request_id, **NO_RETRY})


def foreign_session(session_id: str) -> ApiError:
    return ApiError(403, f"session {session_id!r} belongs to another tenant")


def submit_owner(svc: Services, who: Principal, new: NewRequest) -> str:
    """The owner a submit enforces on its session ("" = any): with auth on the request's tenant, the admin's
    too (it submits for a tenant, into that tenant's sessions only); with auth off none."""
    return (who.owner or new.tenant) if svc.keyring.enabled else ""


async def check_session_owner(svc: Services, owner: str, session_id: str) -> None:
    """403 when the session belongs to another tenant than `owner` (submit_owner): read on a refusal's way
    only (a stored submit checks it in its own script)."""
    stored, _ = await svc.store.session_state(session_id)
    if owner and stored is not None and stored != owner:
        raise foreign_session(session_id)


async def give_back_unstored(give_back: Callable[[], Awaitable[None]], request_id: str) -> None:
    """Give back the max_queued place of a submit that stored nothing, on the way to its own 503: a store
    still failing keeps the place, which the next check of the full set frees once SUBMIT_SECONDS old."""
    try:
        await give_back()
    except Exception as error:  # the submit's error is the answer, not this one
        log.warning("giving back the place of %s after a failed submit failed: %s: %s", request_id,
                    type(error).__name__, error)


async def submit_request(request: Request, who: Principal, new: NewRequest,
                         callback: str | None = None, *, params_at: str = "params",
                         max_tokens_at: str = "max_tokens") -> dict[str, str | int]:
    """Store `new`, or raise its ApiError. `callback` (checked) is used here only when the submit's answer
    is lost (MaybeStored); otherwise the caller notes it once the request is stored. `params_at`: where the
    body holds the params, for a 422 naming one ("" for the chat route, whose params are the body's fields);
    `max_tokens_at`: the field that gave `max_tokens` (the chat route's `max_completion_tokens`)."""
    svc = services(request)
    try:
        new.input_text.encode()
    except UnicodeEncodeError:  # e.g. a lone surrogate ("\ud800"), which JSON allows and UTF-8 does not
        raise ApiError(422, "prompt/messages: not valid Unicode text (a lone surrogate?)") from None
    except TooDeep:
        raise NestedTooDeep(422, f"messages: nested deeper than {MAX_NESTING} arrays/objects") from None
    except ValueError:  # a field of a message (e.g. `name`) that is NaN or Infinity
        raise ApiError(422, "messages: NaN and Infinity are not JSON numbers") from None
    try:
        new.params_json  # noqa: B018 - made here, then stored and sent to engines as is: NaN is not JSON
    except TooDeep:
        raise NestedTooDeep(422, f"params: nested deeper than {MAX_NESTING} arrays/objects") from None
    except ValueError:
        raise ApiError(422, "params: NaN and Infinity are not JSON numbers") from None
    # Stored with json.dumps, which takes them, then sent by the engine with orjson, which does not: refused here,
    # not failed at the worker (a 502 "worker error", a slot taken and a traceback per call).
    # The messages too: an integer past 64 bits in one was stored, then read back by the worker as a float and
    # sent changed (`1e+23`).
    refused = unsendable(new.params, params_at)
    if refused is None and new.messages is not None:
        refused = unsendable_value(new.messages, "messages")
    if refused is not None:
        raise ApiError(422, f"{refused[0]}: {refused[1]}")
    if new.max_tokens > svc.settings.max_tokens_limit:
        raise ApiError(422, f"{max_tokens_at}: at most {svc.settings.max_tokens_limit} (--max-tokens-limit)")
    cap = await svc.guardrails.check_priority(who, new.priority)  # before the submit: a refused one stores nothing
    if new.deadline_ms is None:
        default = await svc.directory.deadline_for(new.group, new.priority)
        if default is not None:
            new = replace(new, deadline_ms=default)
    if cap is not None and new.deadline_ms is not None:
        new = replace(new, boost_cap=cap)
    if TRACING.get() is not None:  # --otel-endpoint: the trace context goes with the request (sluicegate/tracing.py)
        new = carry_trace(new)
    await check_group(svc, new.group)  # before max_queued: an unknown group is its 404 at any count
    # max_queued (429): the request's tenant, the admin's too (it submits for a tenant); auth off limits no one
    tenant = new.tenant if svc.keyring.enabled else None
    owner = submit_owner(svc, who, new)
    try:
        give_back = await svc.guardrails.take_place(who, tenant, new.request_id)
    except ApiError:  # 429 at max_queued: a session of another tenant is its 403 at any count, as below it
        await check_session_owner(svc, owner, new.session_id)
        raise
    # Once the call is about to be written (on_sending: its connection in hand), a store that stalls runs it
    # when it resumes, after the response deadline has cut the route (api/deadline.py): the answer then is this
    # 503 naming the request, not the plain one that says retry (before it, nothing can have been stored: the
    # plain one is right). Kept once stored (an instant before the deadline is lifted, it may still fire) or
    # maybe stored; withdrawn where nothing was. Its max_queued place stays taken, as for MaybeStored.
    def sending() -> None:
        note_pending_submit(request.scope, lambda: maybe_stored(new, None if callback is None else False))

    try:
        result = await svc.store.submit(new, owner=owner, on_sending=sending)
    except MaybeStored as lost:
        log.warning("%s", lost)
        # The caller notes the callback only after an answer: tried once here (a no-op when it was not stored),
        # or a client that finds the request stored would wait for a callback that never comes.
        noted = None if callback is None else await note_callback_of_lost(svc, new.request_id, callback)
        error = maybe_stored(new, noted)
        note_pending_submit(request.scope, lambda: error)
        raise error from lost
    except Exception as error:
        note_pending_submit(request.scope, None)  # the store answered with an error, or the call never went out
        # Store unavailable here means nothing was stored (_submit_call: refused, or never sent; a lost answer
        # is MaybeStored above): the place goes back, or a tenant near max_queued is refused for SUBMIT_SECONDS.
        if give_back is not None and store_unavailable(error):
            await give_back_unstored(give_back, new.request_id)
        raise
    if result.outcome != "ok":
        note_pending_submit(request.scope, None)  # refused by the script: nothing stored
    if give_back is not None and result.outcome != "ok":
        await give_back()
    if result.outcome == "forbidden":
        raise foreign_session(new.session_id)
    if result.outcome == "unknown_group":  # the store's own check (check_group above makes it rare)
        raise unknown_group(new.group)
    return {"request_id": result.request_id, "session_id": new.session_id, "status": "queued",
            "events_url": f"/v1/requests/{result.request_id}/events", "first_event_id": result.first_event_id}


def callback_lost(error: Exception, reply: dict[str, str | int]) -> JSON:
    """The answer when the store fails noting the callback of a request the submit stored: a 503 naming that
    request, without Retry-After (a retry would store and generate it a second time). The note may have been
    made all the same (an answer lost after the script ran), so the message does not promise either way."""
    log.warning("redis unavailable noting the callback of %s: %s: %s", reply["request_id"], type(error).__name__,
                error)
    message = ("the queue store (Redis) is unavailable; the request was stored and runs on, but its callback "
               "may not have been noted (GET /v1/requests/{id} shows a `callback` when it was): do not submit it "
               f"again, read it at {reply['events_url']}")
    body = {"error": {"type": "unavailable", "message": message, "code": "callback_not_noted"},
            "request_id": reply["request_id"], "session_id": reply["session_id"], "events_url": reply["events_url"]}
    return JSON(body, status_code=503, headers={"X-Request-Id": str(reply["request_id"]), **NO_RETRY})


@router.post("/v1/sessions/{session_id}/requests", status_code=202)
async def submit(session_id: str, body: SubmitBody, request: Request, who: Principal = Depends(principal),
                 _: None = Depends(require_json)):  # after the key checks (401 first), before the body's 422
    return await submit_body(request, who, session_id, body)


async def submit_body(request: Request, who: Principal, session_id: str, body: SubmitBody) -> JSON:
    """The submit once its body is valid and its caller known (the route and api/hot_path.py)."""
    tenant = submit_tenant(who, body)  # first, as when the body's schema checked it
    check_session_id(session_id)
    svc = services(request)
    callback = check_callback(svc, body.callback_url)  # push mode: 422 before anything is stored
    new = NewRequest(session_id=session_id, max_tokens=body.budget(svc.settings.max_tokens_limit),
                     priority=int(body.priority),
                     tenant=tenant, group=body.group, prompt=body.prompt,
                     messages=[m.model_dump() for m in body.messages] if body.messages else None,
                     params=body.params, deadline_ms=body.deadline_ms,
                     fail_on_deadline_miss=body.on_deadline_miss == "fail")
    # A session this process follows: a reader joined before the submit has every event of the request, so
    # its GET /v1/requests/{id}/events here streams without a log read (api/recent.py). Not in push mode (a
    # callback_url): that caller is told the outcome, and no GET is expected.
    joined = svc.hub.join_live(session_id) if callback is None else None

    def leave() -> None:
        if joined is not None:
            svc.hub.leave(session_id, joined)

    try:
        reply = await submit_request(request, who, new, callback)
    except BaseException:
        leave()
        raise
    # Stored from here on: the store failing is the stored request's 503, not the plain one that says retry, so
    # the response deadline (whose 503 says retry) is lifted; attach_callback bounds its own wait.
    lift_response_deadline(request.scope)
    try:
        await attach_callback(svc, str(reply["request_id"]), callback)
    except BaseException as error:
        leave()
        if isinstance(error, Exception) and store_unavailable(error):
            return callback_lost(error, reply)
        raise
    svc.recent.note(str(reply["request_id"]), new.session_id, new.tenant, int(reply["first_event_id"]), joined)
    return JSON(reply, status_code=202)


async def migrated_id(svc: Services, request_id: str) -> str | None:
    """The new id `sluicegate migrate` gave a request of the old key layout (its `sg:alias:<old id>`), None
    when there is none. Asked only once `request_id` named no request: a current id costs no extra read.
    The caller then treats the new id as if the client had named it (its owner checked the same way)."""
    if not OLD_REQUEST_ID.fullmatch(request_id):
        return None
    new = await svc.redis.get(keys.alias(request_id))
    return None if new is None or text(new) == request_id else text(new)


async def request_fields(svc: Services, request_id: str) -> tuple[str, dict[str, str] | None]:
    """A request's id and fields, by its id or, an old id, by the new one it names (migrated_id)."""
    fields = await svc.store.request_fields(request_id)
    if fields is None and (new := await migrated_id(svc, request_id)) is not None:
        return new, await svc.store.request_fields(new)
    return request_id, fields


@router.get("/v1/requests/{request_id}")
async def get_request(request_id: str, request: Request, who: Principal = Depends(principal),
                      include: str = ""):
    """`?include=output` adds `output`, the text so far (polling mode, api/output.py). An old id (before the
    cluster layout) answers for its request under the new id."""
    asked = request_id
    request_id, fields = await request_fields(services(request), request_id)
    if fields is None or (who.tenant and fields.get("tn") != who.tenant):
        raise ApiError(404, f"no request {asked!r}")
    view = request_view(request_id, fields)
    if "output" in include.split(","):
        view.update(await request_output(services(request).store, request_id, fields))
    return JSON(view)


@router.delete("/v1/requests/{request_id}")
async def cancel_request(request_id: str, request: Request, who: Principal = Depends(principal)):
    """An old id (before the cluster layout) cancels its request, answered under the new id."""
    svc, asked = services(request), request_id
    outcome = await svc.store.cancel(request_id, owner=who.owner)
    if outcome[0] == "missing" and (new := await migrated_id(svc, request_id)) is not None:
        request_id, outcome = new, await svc.store.cancel(new, owner=who.owner)
    if outcome[0] in ("missing", "forbidden"):
        raise ApiError(404, f"no request {asked!r}")
    if outcome[0] == "terminal":
        raise ApiError(409, f"request {request_id!r} already ended ({outcome[1]})")
    fields = await svc.store.request_fields(request_id) or {}
    return JSON(request_view(request_id, fields), status_code=200)
