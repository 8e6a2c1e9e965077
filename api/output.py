"""Polling mode: `GET /v1/requests/{id}?include=output`, the text a request has produced so far, read
from its session's log (its token events, from its `queued` event on)."""

from __future__ import annotations

from typing import Any

import orjson

from sluicegate.sessions.store import CursorExpired, SessionStore

PAGE = 1000  # events read per call


async def request_output(store: SessionStore, rid: str, fields: dict[str, str]) -> dict[str, Any]:
    """{"output": text} (each token index once, in order), or {"output": None, "output_error": why} when
    the log no longer holds the request's events (trimmed, --session-log-max-events, or expired)."""
    sid = fields.get("sid", "")
    cursor = int(fields.get("fs", 1)) - 1
    texts: list[str] = []
    while True:
        try:
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
