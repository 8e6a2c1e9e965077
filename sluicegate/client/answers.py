"""What the API answers, decoded and checked before a caller sees it: a success's JSON body against the
fields its route always answers (a catch-all's `{"ok": true}` is `not_the_api`, not a success the caller
would print), an event's or a chat chunk's data, and the values made of them (`Event`, `Submitted`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import ServerSentEvent

from sluicegate.client.errors import SluicegateError, _body_error, _one_line

TERMINAL = frozenset({"done", "error", "cancelled"})


@dataclass(frozen=True)
class Event:
    """One event of a session's log: `event` (queued, started, token, ..., done), its `id` (strictly
    increasing within the session: the resume cursor) and its JSON `data`."""

    event: str
    id: int
    data: dict[str, Any]

    @property
    def request_id(self) -> str | None:
        return self.data.get("request_id")

    @property
    def text(self) -> str:
        """A token's text ('' for the other events)."""
        return str(self.data.get("text") or "")

    @property
    def index(self) -> int | None:
        """A token's 0-based position in its request's output."""
        return self.data.get("index")

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.event, "id": self.id, "data": self.data}


@dataclass(frozen=True)
class Submitted:
    """The answer to a submit (202)."""

    request_id: str
    session_id: str
    events_url: str
    status: str = "queued"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _submitted(payload: dict[str, Any]) -> Submitted:
    return Submitted(request_id=payload["request_id"], session_id=payload["session_id"],
                     events_url=payload.get("events_url", ""), status=payload.get("status", "queued"), raw=payload)


def _json_of(response: httpx.Response) -> Any:
    """A success's JSON body (None when empty). A body that is not JSON came from something other than the
    API at this URL (another app's page, a login proxy): `not_json`, the call answered but not by the API."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError as error:
        raise SluicegateError(response.status_code, "not_json", f"the answer is not the API's JSON "
                              f"({response.headers.get('content-type')}): {_one_line(response.content)}",
                              request_id=response.headers.get("x-request-id")) from error


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _objects(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


Shape = tuple[tuple[str, Callable[[Any], bool]], ...]  # the fields a route's answer always has, and their test
ANY_OBJECT: Shape = ()
SUBMITTED: Shape = (("request_id", _text), ("session_id", _text))
REQUEST: Shape = (("request_id", _text),)
GROUP: Shape = (("group", _text),)
TENANT: Shape = (("tenant", _text), ("weight", _number))
GROUPS: Shape = (("groups", _objects),)
TENANTS: Shape = (("tenants", _objects),)
STATS: Shape = (("queued", _number), ("groups", _objects), ("workers", _objects))
CHAT: Shape = (("choices", _objects),)


def _shaped(response: httpx.Response, payload: Any, shape: Shape) -> dict[str, Any]:
    """`payload` when it is a JSON object with the fields the route always answers. Anything else (a catch-all's
    `{"ok": true}`, a list, a 2xx with no body) answered the call but is not the API: `not_the_api`, rather
    than a success the caller would print or a KeyError later."""
    if isinstance(payload, dict) and all(test(payload.get(name)) for name, test in shape):
        return payload
    wanted = f"a JSON object with {', '.join(name for name, _ in shape)}" if shape else "a JSON object"
    raise SluicegateError(response.status_code, "not_the_api", f"the answer is not the API's ({wanted} was "
                          f"expected): {_one_line(response.content) or 'no body'}", payload,
                          request_id=response.headers.get("x-request-id"))


def _event_data(sse: ServerSentEvent, request_id: str | None = None) -> Any:
    """An event's JSON data, or `bad_event` (a SluicegateError, as every failure here is) for data that is not
    JSON: an event cut by something on the way (httpx-sse before 0.4.2 split lines on U+2028), or not the API."""
    try:
        return json.loads(sse.data)
    except ValueError as error:
        raise SluicegateError(200, "bad_event", f"an event whose data is not JSON (id {sse.id or 'none'}, "
                              f"{sse.event}): {error}: {_one_line(sse.data.encode())}",
                              request_id=request_id) from error


def _chunk(sse: ServerSentEvent, request_id: str | None) -> dict[str, Any] | None:
    """One chat chunk, None at `[DONE]`; raises the error object the route sends when generation fails."""
    if sse.data.strip() == "[DONE]":
        return None
    payload = _event_data(sse, request_id)
    error = _body_error(payload, request_id)
    if error is not None:
        raise error
    return payload
