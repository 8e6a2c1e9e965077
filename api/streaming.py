"""Server-Sent Events: a session's or a request's events, resumable with Last-Event-ID or ?after=."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from sluicegate.api.auth import Principal
from sluicegate.api.errors import ApiError
from sluicegate.api.key_watch import ENDED_MESSAGE, KeyWatch, key_watch
from sluicegate.api.output import another_request_first, first_event_gone
from sluicegate.api.requests_routes import check_session_id, migrated_id
from sluicegate.api.responses import EventStreamResponse, LastChunk
from sluicegate.api.services import Services, services
from sluicegate.api.stream_tokens import request_stream_principal, session_stream_principal
from sluicegate.sessions import keys
from sluicegate.sessions.store import LogBounds, SessionStore
from sluicegate.sessions.stream import EventStream

router = APIRouter()
PING = b": ping\n\n"
KEY_ENDED = LastChunk(f": {ENDED_MESSAGE}\n\n".encode())
MAX_EVENT_ID = 2**53 - 1  # the scripts hold ids as Lua numbers (doubles): past this they are not exact


def resume_cursor(request: Request) -> int:
    raw = (request.headers.get("last-event-id") or request.query_params.get("after") or "0").strip()
    # ASCII digits only: str.isdigit() also accepts "²", which int() rejects
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16 and int(raw) <= MAX_EVENT_ID):
        raise ApiError(422, f"Last-Event-ID / after must be an event id (an integer 0..{MAX_EVENT_ID})")
    return int(raw)


async def sse_bytes(svc: Services, stream: EventStream, watch: KeyWatch | None = None) -> AsyncIterator[bytes]:
    """The stream's bytes; it ends when its key is revoked or expires (api/key_watch.py): checked before
    a batch or ping goes out, every few seconds (a clock read otherwise)."""
    with svc.stream_open():
        async with aclosing(stream.batches()) as batches:  # closed at once, not by the garbage collector
            async for batch in batches:
                if watch is not None and watch.due() and await watch.ended():
                    yield KEY_ENDED  # the client's reconnect gets the 401
                    return
                if not batch:
                    yield PING
                elif stream.finished:  # a request's terminal event: the stream's end goes out with it
                    yield LastChunk(b"".join(event.sse() for event in batch))
                    return
                else:
                    yield b"".join(event.sse() for event in batch)


# sse-starlette's headers, so that the lean response below answers exactly as EventSourceResponse did.
SSE_HEADERS = {"Cache-Control": "no-store", "Connection": "keep-alive", "X-Accel-Buffering": "no"}


def sse_response(svc: Services, stream: EventStream, on_close: Callable[[], None],
                 who: Principal | None = None) -> EventStreamResponse:
    """The lean streamed response (api/responses.py) with sse-starlette's headers, ended at shutdown as
    sse-starlette ends its streams. sse-starlette ran four tasks in an anyio task group per stream; this
    runs one watcher. `on_close` runs however the response ends (a client gone before
    the body started never runs the generator's `finally`: the stream is closed here too)."""

    def closed() -> None:
        stream.close()
        on_close()

    watch = key_watch(svc.keyring, who) if who is not None else None
    return EventStreamResponse(sse_bytes(svc, stream, watch), headers=dict(SSE_HEADERS), on_close=closed,
                               end_on_shutdown=True)


def check_cursor(session_id: str, cursor: int, bounds: LogBounds) -> None:
    """Refuse (409) a cursor that cannot be resumed without a gap or a wrong event, instead of streaming:
    - past the session's last event: the session was recycled after its TTL and started over, the id
      was lost when the store restarted from an older state, or it never existed;
    - inside an id hole a store restart left: it may name an event handed out and lost (AOF everysec,
      a failover), so later ids are not its successors;
    - before the oldest kept event minus one: the events after it were trimmed (--session-log-max-events)."""
    if cursor > bounds.last_id:
        raise ApiError(409, f"event id {cursor} is past the last event of session {session_id!r}, "
                            f"{bounds.last_id}: the session started over after its TTL (reconnect without a "
                            f"cursor: every event is new to you), or the store restarted from an older state and "
                            f"lost the events after {bounds.last_id} (resume from {bounds.last_id}: the ids it "
                            "hands out next skip past the lost ones)", "cursor_expired")
    lost_before = bounds.lost_before(cursor)
    if lost_before is not None:
        raise ApiError(409, f"event id {cursor} of session {session_id!r} was lost when the store restarted from "
                            f"an older state: the last event kept before it is {lost_before}; resume from "
                            f"{lost_before} or reconnect without a cursor", "cursor_expired")
    if bounds.trimmed(cursor):
        raise cursor_expired(session_id, cursor, bounds.oldest_kept)


def cursor_expired(session_id: str, cursor: int, oldest_kept: int) -> ApiError:
    return ApiError(409, f"event id {cursor} is older than the log of session {session_id!r} keeps "
                         f"(--session-log-max-events): the oldest kept event is {oldest_kept}; resume from "
                         f"{oldest_kept - 1} or reconnect without a cursor, accepting the gap", "cursor_expired")


def another_request_at(stream: EventStream, first: int) -> str | None:
    """Why the event with id `first` (a request's first, its `queued`) is not the request's, if it is
    another's: the session expired while the request's hash was kept (a callback still being retried
    keeps it) and its id was used again, its new life numbering from 1. Read from the first page `open`
    read (from `first - 1`), so no extra read."""
    events = stream.first_page
    if events and events[0].seq == first and events[0].request_id != stream.request_id:
        return f"the session expired and its id was used again: event id {first} is another request's"
    return None


def log_gone(session_id: str, request_id: str, why: str) -> ApiError:
    """A stream of a request none of whose events its session's log holds would be empty: an
    EventSource would reconnect to it for ever (it stops only at a status other than 200)."""
    return ApiError(409, f"the log of session {session_id!r} no longer holds the events of request "
                         f"{request_id!r}: {why}; its final state is at GET /v1/requests/{request_id}",
                    "cursor_expired")


async def not_its_life(store: SessionStore, stream: EventStream, first: int, bounds: LogBounds) -> str | None:
    """Why the log that holds none of an ended request's events after a resume's cursor (a 204 but for
    this) is not the request's, if it is not: its session expired and the id was used again, the new life
    numbering from 1 (the request's hash outlived it: a callback still being retried keeps it), so the
    cursor may be anywhere in the request's events, not past its end. The checks of a stream without a
    cursor, at the request's first event. The event at the cursor (read with the first page: `open`) is
    the request's own at an EventSource's reconnect after its terminal event, which settles it without a
    read; else the request's first event is read (one read, on this path only). Only a sign of another life
    answers 409: a first event trimmed by later requests' events is none (a reconnect whose cursor event was
    trimmed too keeps its 204)."""
    at = stream.at_cursor
    if at is not None and at.request_id == stream.request_id:
        return None
    if bounds.last_id < first:  # the log ends before the request's first event: not its life's
        return first_event_gone(bounds, first)
    if bounds.oldest_kept > first:  # trimmed past it (a later request's events): no sign of another life,
        return None  # and the cursor, checked, is past whatever is left: the 204 of a request read to its end
    _bounds, events = await store.read_page(stream.session_id, first - 1, 1)
    return another_request_first(events, first, stream.request_id or "")


async def session_stream(svc: Services, who: Principal, session_id: str, request: Request) -> EventStreamResponse:
    """GET /v1/sessions/{id}/events once the caller is known (the route and api/hot_path.py)."""
    check_session_id(session_id)
    owner, bounds = await svc.store.session_state(session_id)
    if owner is None or (who.tenant and owner != who.tenant):
        raise ApiError(404, f"no session {session_id!r} (never used, or recycled after its TTL)")
    cursor = resume_cursor(request)
    check_cursor(session_id, cursor, bounds)
    release = await svc.guardrails.open_stream(who)  # last: a refused stream was otherwise valid (429)
    stream = EventStream(svc.store, svc.hub, session_id, after=cursor, idle_seconds=svc.settings.sse_ping_seconds,
                         owner=who.tenant or None)  # a tenant's stream ends should the id be recycled for another
    return sse_response(svc, stream, release, who)


async def request_stream(svc: Services, who: Principal, request_id: str, request: Request, *,
                         reread: bool = False) -> Response:
    """GET /v1/requests/{id}/events once the caller is known (the route and api/hot_path.py). Two reads:
    the request's head (none for a request this process has just accepted: api/recent.py), then (after
    joining its session's channel, unless it ended) the log's first page, whose bounds check the cursor,
    instead of a separate read of them first. None at all for a request accepted here on a session this
    process follows, unless it resumes: the reader that joined before the submit has every event.
    A resume reads the head even of a request just accepted here: it may have ended since, streamed by
    another process. A resume of an ended request from its terminal event or later is a 204 (No
    Content): an EventSource reconnects after a stream that ends, whatever it held, and stops only at a
    status other than 200; unless the log is not the request's life's (its session's id was used again:
    `not_its_life`), the 409 of the same stream without a cursor. An old id (before the cluster layout)
    streams its request under the new id."""
    accepted = None if reread else svc.recent.take(request_id)
    known = accepted.head if accepted is not None else None
    joined = accepted.reader if accepted is not None else None
    asked = request_id
    try:
        head = known or await svc.store.request_head(request_id)
        if head is None and (new := await migrated_id(svc, request_id)) is not None:
            request_id, head = new, await svc.store.request_head(new)
        if head is None or (who.tenant and head.get("tn") != who.tenant):
            raise ApiError(404, f"no request {asked!r}")
        cursor = resume_cursor(request)
    except BaseException:
        if accepted is not None and joined is not None:
            svc.hub.leave(accepted.head["sid"], joined)
        raise
    resuming = cursor > 0
    if known is not None and resuming:  # a resume reads the request as usual: it may have ended meanwhile,
        if joined is not None:  # and is checked against the log (a 204 past its end, else it waits for good)
            svc.hub.leave(head["sid"], joined)
            joined = None
        known = None
        head = await svc.store.request_head(request_id)
        if head is None or (who.tenant and head.get("tn") != who.tenant):
            raise ApiError(404, f"no request {request_id!r}")
    sid, status, first = head["sid"], head.get("st"), int(head.get("fs", 1))
    if not resuming:
        cursor = first - 1
    stream = EventStream(svc.store, svc.hub, sid, after=cursor, request_id=request_id,
                         request_status="queued" if known else status, idle_seconds=svc.settings.sse_ping_seconds,
                         joined=joined, first_event=first)
    try:
        if joined is None:  # (else every event of the request comes live: no log read, nothing to check in it)
            bounds = await stream.open(at_cursor=resuming)
            if known and not bounds.holds(int(known["fs"])):  # lost in a store restart: read the request itself
                stream.close()
                return await request_stream(svc, who, request_id, request, reread=True)
            if resuming:
                check_cursor(sid, cursor, bounds)
                if stream.reader is None and await stream.exhausted():  # ended (not joined), nothing left
                    stream.close()
                    if (gone := await not_its_life(svc.store, stream, first, bounds)) is not None:
                        raise log_gone(sid, request_id, gone)
                    return Response(status_code=204)
                # (An ended request's events found after the cursor show the log is its life's: no check. A
                # request not ended keeps its session, and so its log, alive: nothing to check either.)
            elif (known or status in keys.TERMINAL_STATUSES) and cursor < bounds.oldest_kept - 1:
                # An ended request's first events may have been trimmed (--session-log-max-events): a
                # stream of it would miss them. A request that has not ended keeps all of its events (the
                # log is never trimmed past its session's head's `queued` event, and the queue is in order),
                # so for a request of unknown status (just accepted) this can only fire once it has ended.
                if known:  # it ended since this process accepted it: its status, for what is left, is the store's
                    stream.close()
                    return await request_stream(svc, who, request_id, request, reread=True)
                stream.cursor = bounds.oldest_kept - 1
                if stream.reader is None and await stream.exhausted():  # none left: a resume would be a 204
                    raise log_gone(sid, request_id, "its events were trimmed (--session-log-max-events)")
                raise ApiError(409, f"the first events of request {request_id!r} are no longer in the log of "
                                    f"session {sid!r} (--session-log-max-events): the oldest kept event is "
                                    f"{bounds.oldest_kept}; resume from {bounds.oldest_kept - 1} (Last-Event-ID) "
                                    "for what is left of it, accepting the gap", "cursor_expired")
            elif (gone := first_event_gone(bounds, cursor + 1) or another_request_at(stream, cursor + 1)) is not None:
                raise log_gone(sid, request_id, gone)  # (the `except` below leaves the channel, if joined)
        release = await svc.guardrails.open_stream(who)
    except BaseException:
        stream.close()  # idempotent
        raise
    return sse_response(svc, stream, release, who)


@router.get("/v1/sessions/{session_id}/events")
async def session_events(session_id: str, request: Request,
                         who: Principal = Depends(session_stream_principal)):
    return await session_stream(services(request), who, session_id, request)


@router.get("/v1/requests/{request_id}/events")
async def request_events(request_id: str, request: Request,
                         who: Principal = Depends(request_stream_principal)):
    return await request_stream(services(request), who, request_id, request)
