"""Server-Sent Events: a session's or a request's events, resumable with Last-Event-ID or ?after=."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from sluicegate.api.auth import Principal
from sluicegate.api.errors import ApiError
from sluicegate.api.requests_routes import check_session_id
from sluicegate.api.services import Services, principal, services
from sluicegate.sessions import keys
from sluicegate.sessions.store import cursor_trimmed
from sluicegate.sessions.stream import EventStream

router = APIRouter()
PING = b": ping\n\n"
MAX_EVENT_ID = 2**53 - 1  # the scripts hold ids as Lua numbers (doubles): past this they are not exact


def resume_cursor(request: Request) -> int:
    raw = (request.headers.get("last-event-id") or request.query_params.get("after") or "0").strip()
    # ASCII digits only: str.isdigit() also accepts "²", which int() rejects
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16 and int(raw) <= MAX_EVENT_ID):
        raise ApiError(422, f"Last-Event-ID / after must be an event id (an integer 0..{MAX_EVENT_ID})")
    return int(raw)


async def sse_bytes(svc: Services, stream: EventStream) -> AsyncIterator[bytes]:
    with svc.stream_open():
        async for batch in stream.batches():
            yield b"".join(event.sse() for event in batch) if batch else PING


class CountedEventSource(EventSourceResponse):
    """Calls `on_close` when the response ends however it ends: a client gone before the body's
    generator ever started never runs that generator's `finally`, so a count kept there would leak."""

    def __init__(self, *args: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse_response(svc: Services, stream: EventStream, on_close: Callable[[], None]) -> EventSourceResponse:
    return CountedEventSource(sse_bytes(svc, stream), ping=0, headers={"Cache-Control": "no-store"},
                              on_close=on_close)


def check_cursor(session_id: str, cursor: int, last_event_id: int, oldest_kept: int) -> None:
    """A cursor past the session's last event cannot be resumed: the session was recycled after its
    TTL and started over, or the id never existed. Say so instead of streaming pings. A cursor before
    the oldest kept event minus one cannot be resumed either: the events after it were trimmed
    (--session-log-max-events), and resuming would skip them."""
    if cursor > last_event_id:
        raise ApiError(409, f"event id {cursor} is past the last event of session {session_id!r} "
                            "(recycled after its TTL, or never issued); reconnect without a cursor")
    if cursor_trimmed(cursor, oldest_kept):
        raise cursor_expired(session_id, cursor, oldest_kept)


def cursor_expired(session_id: str, cursor: int, oldest_kept: int) -> ApiError:
    return ApiError(409, f"event id {cursor} is older than the log of session {session_id!r} keeps "
                         f"(--session-log-max-events): the oldest kept event is {oldest_kept}; resume from "
                         f"{oldest_kept - 1} or reconnect without a cursor, accepting the gap", "cursor_expired")


@router.get("/v1/sessions/{session_id}/events")
async def session_events(session_id: str, request: Request, who: Principal = Depends(principal)):
    svc = services(request)
    check_session_id(session_id)
    owner, last_event_id, oldest_kept = await svc.store.session_state(session_id)
    if owner is None or (who.tenant and owner != who.tenant):
        raise ApiError(404, f"no session {session_id!r} (never used, or recycled after its TTL)")
    cursor = resume_cursor(request)
    check_cursor(session_id, cursor, last_event_id, oldest_kept)
    release = await svc.guardrails.open_stream(who)  # last: a refused stream was otherwise valid (429)
    stream = EventStream(svc.store, svc.hub, session_id, after=cursor, idle_seconds=svc.settings.sse_ping_seconds)
    return sse_response(svc, stream, release)


@router.get("/v1/requests/{request_id}/events")
async def request_events(request_id: str, request: Request, who: Principal = Depends(principal)):
    svc = services(request)
    fields = await svc.store.request_fields(request_id)
    if fields is None or (who.tenant and fields.get("tn") != who.tenant):
        raise ApiError(404, f"no request {request_id!r}")
    cursor = resume_cursor(request)
    if cursor:  # only a resume needs the session's last id (one more read)
        _, last_event_id, oldest_kept = await svc.store.session_state(fields["sid"])
        check_cursor(fields["sid"], cursor, last_event_id, oldest_kept)
    else:
        cursor = int(fields.get("fs", 1)) - 1
        if fields.get("st") in keys.TERMINAL_STATUSES:
            # An ended request's first events may have been trimmed (--session-log-max-events): a
            # stream of it would miss them. A request that has not ended keeps all of its events (the
            # log is never trimmed past its session's head's `queued` event, and the queue is in order).
            oldest_kept = (await svc.store.session_state(fields["sid"]))[2]
            if cursor < oldest_kept - 1:
                raise cursor_expired(fields["sid"], cursor, oldest_kept)
    release = await svc.guardrails.open_stream(who)
    stream = EventStream(svc.store, svc.hub, fields["sid"], after=cursor, request_id=request_id,
                         request_status=fields.get("st"), idle_seconds=svc.settings.sse_ping_seconds)
    return sse_response(svc, stream, release)
