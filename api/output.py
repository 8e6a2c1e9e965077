"""Polling mode: `GET /v1/requests/{id}?include=output`, the text a request has produced so far, read
from its session's log (its token events, from its `queued` event on)."""

from __future__ import annotations

from typing import Any

import orjson

from sluicegate.sessions.events import Event
from sluicegate.sessions.store import CursorExpired, LogBounds, SessionStore, log_gap

PAGE = 1000  # events read per call


async def request_output(store: SessionStore, rid: str, fields: dict[str, str]) -> dict[str, Any]:
    """{"output": text} (each token index once, in order), or {"output": None, "output_error": why} when
    the log no longer holds the request's events (trimmed, --session-log-max-events, or expired)."""
    sid = fields.get("sid", "")
    first = int(fields.get("fs", 1))  # the request's own first event (its `queued`)
    cursor = first - 1
    texts: list[str] = []
    while True:
        try:
            if cursor == first - 1:  # the first page: the request's first event must be there
                bounds, events = await store.read_page(sid, cursor, PAGE)
                gone = first_event_gone(bounds, first) or another_request_first(events, first, rid)
                if gone is not None:
                    return {"output": None, "output_error": f"the session's log no longer holds its events: {gone}"}
                gap = log_gap(bounds, cursor)
                if gap is not None:
                    raise gap
            else:
                _last, events = await store.read_events(sid, cursor, PAGE)
        except CursorExpired as error:
            return {"output": None, "output_error": f"the session's log no longer holds its events: {error}"}
        for event in events:
            if event.request_id != rid:
                continue
            if event.name == "token":
                data = orjson.loads(event.data)
                if data.get("index") == len(texts):
                    texts.append(data.get("text") or "")
            elif event.terminal:
                return {"output": "".join(texts)}
        if len(events) < PAGE:
            return {"output": "".join(texts)}
        cursor = events[-1].seq


def first_event_gone(bounds: LogBounds, first: int) -> str | None:
    """Why the request's first event (id `first`) is no longer in the log, if it is not. A read from
    cursor 0 (a session's first request) means "from the oldest kept" to the log, which no gap check
    refuses: without this, a request whose events were all trimmed, or whose session expired, would read
    as one that produced nothing."""
    if bounds.last_id < first:
        return "the session expired (its log is gone)"
    if bounds.oldest_kept > first:
        return f"event id {first} was trimmed from the session's log; the oldest kept event is {bounds.oldest_kept}"
    return None


def another_request_first(events: list[Event], first: int, rid: str) -> str | None:
    """Why the event with id `first` is not the request's own `queued`, if another request's: the session
    expired while the request's hash was kept (a callback still being retried keeps it) and its id was used
    again, the new life numbering from 1. Its ids then pass `first_event_gone`, and every event is another
    request's: without this, the output would read as an empty text. (The request stream's check:
    api/streaming.py `another_request_at`.)"""
    if events and events[0].seq == first and events[0].request_id != rid:
        return f"the session expired and its id was used again: event id {first} is another request's"
    return None
