"""Python client for the Sluicegate HTTP API: `Client` (sync) and `AsyncClient` (asyncio), on httpx.

    from sluicegate.client import Client

    with Client() as sg:                      # SLUICEGATE_URL, SLUICEGATE_API_KEY
        sub = sg.submit("chat-42", "Tell me about sluice gates", max_tokens=40, priority="high")
        for event in sg.stream(request_id=sub.request_id):
            if event.event == "token":
                print(event.text, end="", flush=True)

`stream()` is the point of a client: generation never depends on the connection, so a dropped
connection or a restarted API is a reconnect with `Last-Event-ID`, not an error. It retries
transport errors, 5xx and bodies that do not decode (`bad_encoding`: a proxy's Content-Encoding on a plain
body) with a bounded, jittered backoff and gives up (`StreamUnavailable`) after
`reconnect_timeout` seconds without a connection; a 4xx is the caller's problem and is raised at
once (`CursorExpired` when the session's log no longer holds the cursor). Every error the API
answers is a `SluicegateError` carrying its status and the `type`/`code` of the JSON error body; an
argument refused before sending (a number JSON cannot carry: nan, inf; a base URL that is not http(s) or does
not parse, or an API key that no header can carry, refused when the client is built) is an `InvalidArgument`, both a
`SluicegateError` and a `ValueError`. A 3xx is an error as a 4xx is (redirects are not followed), and a 2xx
that is not what the route answers (a catch-all's `{"ok": true}`, a list, no body) is `not_the_api`. No
message names the API key or the password of a URL's userinfo.

A non-streamed `chat()` waits for its answer as long as its request takes (nothing is written before it;
`chat_timeout` bounds the wait). A streamed one is a `ChatStream` that owns its connection (read it to its
end, close it, or use `with`) and carries `request_id` and `session_id`, to follow with `stream()`.

This module talks HTTP only: it must not import the server's packages (sluicegate.api and friends).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload
from urllib.parse import quote

import httpx
from httpx_sse import EventSource, ServerSentEvent, SSEError, aconnect_sse, connect_sse

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"done", "error", "cancelled"})
NEVER_HEALS = frozenset({501, 505})  # the 5xx a retry cannot change; every other 5xx is retried (a proxy's 520-524 too)
Priority = int | str  # 0..9 or low|normal|high|critical


class _Keep:
    """The default of an admin field that is left as it is (None means "unlimited" / "default")."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


# ---- values ---------------------------------------------------------------------------------------
class SluicegateError(Exception):
    """An error answer of the API (`status`, and `code`/`message` from its JSON body), or no answer at all
    (`status` None: the server could not be reached). `request_id` is the answer's `X-Request-Id` (a chat
    call refused or failed after its request was stored, or a streamed chat cut): its events stay
    readable with `stream(request_id=...)`; None when there is none."""

    def __init__(self, status: int | None, code: str, message: str, body: Any = None,
                 retry_after: float | None = None, request_id: str | None = None) -> None:
        super().__init__(f"{status if status is not None else 'no answer'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.retry_after = retry_after
        self.request_id = request_id


class InvalidArgument(SluicegateError, ValueError):
    """An argument refused before anything was sent (422 `invalid_request`, as the server words a bad
    field): a number JSON cannot carry (nan, inf), or a base URL that does not parse, has no http(s) scheme
    or no host, or an `@` past its host (a password's unencoded `/`), or an API key with a character a header
    cannot carry (a line end, a NUL, a non-ASCII character, a space or tab at either end; a space inside is
    carried) (raised by the constructor). Also a ValueError, which such calls raised before."""


class CursorExpired(SluicegateError):
    """409 `cursor_expired`: the session's log was trimmed past the resume cursor (the message names the
    oldest kept id). Resuming silently without a cursor would skip events, so the caller decides."""


class StreamUnavailable(SluicegateError):
    """A stream could not be (re)connected within `reconnect_timeout` seconds."""


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


# ---- what the sync and async clients share -------------------------------------------------------
def _quoted(value: str) -> str:
    """`value` as one path segment. "." and ".." are names the server accepts (a session, a tenant, a group),
    but as segments they are dot segments, which httpx removes as any URL resolver does (`/v1/sessions/..`
    would reach `/v1`): `%2E` keeps them a name, and the server decodes it before it routes."""
    if value in (".", ".."):
        return "%2E" * len(value)
    return quote(value, safe="")


def _session_path(session_id: str) -> str:
    """`/v1/sessions/<id>`. An id with `/` would reach no route (the server decodes `%2F` before it
    routes: a 404 "no such endpoint"): refused here as the server refuses every other bad id."""
    if "/" in session_id:
        raise SluicegateError(422, "invalid_request", "session_id: 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    return f"/v1/sessions/{_quoted(session_id)}"


def _error_from(response: httpx.Response, body: bytes) -> SluicegateError:
    """The API's `{"error": {"type", "message", "code"?}}`, or whatever a proxy answered instead."""
    parsed: Any = None  # a proxy's HTML page is one line here, as every refusal is
    code, message = _status_code_name(response.status_code), _one_line(body)
    with contextlib.suppress(ValueError):
        parsed = json.loads(body) if body else None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        named = error.get("code") if isinstance(error.get("code"), str) else error.get("type")
        code = str(named or code)
        message = str(error.get("message") or message)
    retry_after = None
    with contextlib.suppress(ValueError):
        retry_after = float(response.headers["retry-after"]) if "retry-after" in response.headers else None
    if 300 <= response.status_code < 400 and "location" in response.headers:  # where, before any page's line
        message = "; ".join(filter(None, [f"redirected to {_shown_url(response.headers['location'])} (redirects "
                                          "are not followed: set the client's URL to where it leads)", message]))
    kind = CursorExpired if code == "cursor_expired" else SluicegateError
    return kind(response.status_code, code, message or response.reason_phrase, parsed, retry_after,
                response.headers.get("x-request-id"))


def _success(response: httpx.Response) -> bool:
    """A 2xx. Anything else is an error answer, a 3xx too: redirects are not followed, and a 3xx's body (often
    none) is no answer of the route."""
    return 200 <= response.status_code < 300


def _undecodable(response: httpx.Response, error: httpx.DecodingError,
                 request_id: str | None = None) -> SluicegateError:
    """A body that does not decode as its Content-Encoding says (a proxy's gzip header on a plain body): an
    error answer is its status alone (a 503 stays a 503, retried where a 503 is); a 2xx is `bad_encoding`."""
    if not _success(response):
        return _error_from(response, b"")
    return SluicegateError(response.status_code, "bad_encoding", "the answer's body does not decode as its "
                           f"Content-Encoding ({response.headers.get('content-encoding')}) says: {error}",
                           request_id=request_id or response.headers.get("x-request-id"))


def _error_body(response: httpx.Response) -> bytes:
    """An error answer's body, read; b"" when it does not decode (the status alone says enough then)."""
    try:
        return response.read()
    except httpx.DecodingError:
        return b""


async def _aerror_body(response: httpx.Response) -> bytes:
    """As _error_body."""
    try:
        return await response.aread()
    except httpx.DecodingError:
        return b""


def _one_line(body: bytes) -> str:
    """A body as one line of at most 500 characters (a proxy's HTML page is one line in a message)."""
    return " ".join(body.decode(errors="replace").split())[:500]


def _status_code_name(status: int) -> str:
    return {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict",
            422: "invalid_request", 429: "rate_limited", 503: "unavailable"}.get(status, f"http_{status}")


def _retried(status: int) -> bool:
    """A 5xx: the server, or a proxy in front of it, is down, restarting or busy (501 and 505 never heal)."""
    return 500 <= status <= 599 and status not in NEVER_HEALS


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


def _not_an_event_stream(error: SSEError, request_id: str | None = None) -> SluicegateError:
    """A 200 that is no event stream: not the API (a proxy's or another app's page)."""
    return SluicegateError(200, "not_an_event_stream", str(error), request_id=request_id)


def _unreachable(error: Exception, url: str) -> SluicegateError:
    """No answer: `unreachable` when nothing was sent (the connection failed, or no connection of the pool
    came free in time); `not_sent` when the request could not be written at all (a header value httpx
    refuses, a scheme it has no transport for: sending it again changes nothing); `no_answer` when the call
    went out and its answer did not come back, so a submit may have been stored (check the session before
    submitting again, or get a duplicate). `url` is one without its userinfo (_shown_url)."""
    if isinstance(error, httpx.LocalProtocolError | httpx.UnsupportedProtocol):
        return SluicegateError(None, "not_sent", f"{url}: not sent, the request could not be written "
                               f"({type(error).__name__}: {error})")
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return SluicegateError(None, "unreachable", f"{url}: {type(error).__name__}: {error}")
    if isinstance(error, httpx.PoolTimeout):  # waited for a free connection of this client: nothing went out
        return SluicegateError(None, "unreachable", f"{url}: not sent, no free connection in the client's pool "
                               f"({type(error).__name__}: {error}); are streams left open?")
    return SluicegateError(None, "no_answer", f"{url}: sent, but no answer came ({type(error).__name__}: {error}); "
                           "a call that changes something (a submit) may have taken effect: look before sending "
                           "it again")


def _body_error(payload: Any, request_id: str | None = None) -> SluicegateError | None:
    """A failure reported inside a 200 (a chat answer whose status went out before it ended)."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        # the failure's `status` (its `code` is the type since 2026-12-06), or an older server's integer code
        status = next((v for v in (error.get("status"), error.get("code")) if isinstance(v, int)), None)
        return SluicegateError(status, str(error.get("type") or "error"), str(error.get("message") or ""), payload,
                               request_id=request_id)
    return None


def _submit_body(prompt: str | Sequence[Mapping[str, Any]], max_tokens: int | None, priority: Priority | None,
                 tenant: str | None, group: str | None, params: Mapping[str, Any] | None, deadline_ms: int | None,
                 on_deadline_miss: str | None, callback_url: str | None) -> dict[str, Any]:
    """Only what is given: the server's defaults stay the server's."""
    body: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"messages": list(prompt)}
    optional = {"max_tokens": max_tokens, "priority": priority, "tenant": tenant, "group": group,
                "params": dict(params) if params else None, "deadline_ms": deadline_ms,
                "on_deadline_miss": on_deadline_miss, "callback_url": callback_url}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _chat_call(messages: Sequence[Mapping[str, Any]], model: str | None, stream: bool, session_id: str | None,
               priority: Priority | None, tenant: str | None, group: str | None, max_tokens: int | None,
               deadline_ms: int | None, callback_url: str | None, extra: dict[str, Any]
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and the X- headers that carry Sluicegate's fields on the OpenAI route."""
    body: dict[str, Any] = {"messages": list(messages), "stream": stream, **extra}
    if model is not None:
        body["model"] = model
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    given = {"X-Session-Id": session_id, "X-Priority": priority, "X-Tenant": tenant, "X-Group": group,
             "X-Deadline-Ms": deadline_ms, "X-Callback-Url": callback_url}
    return _json_safe(body), {k: str(v) for k, v in given.items() if v is not None}


def _json_safe(value: Any, where: str = "") -> Any:
    """`value`, or InvalidArgument naming the field that holds nan or inf: JSON cannot carry them, and
    httpx would refuse the whole body with a bare ValueError that names no field."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(422, "invalid_request", f"{where or 'body'}: a finite number, not {value!r}")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _json_safe(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _json_safe(item, f"{where}[{index}]")
    return value


def _admin_fields(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not KEEP}


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


class _Retry(Exception):
    """Internal: this attempt failed in a way worth a reconnect."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Follow:
    """The resume logic of one `stream()` call, apart from its I/O: the cursor, when to stop, and the
    backoff between reconnects (jittered, doubling up to `max_backoff`, at least the server's
    Retry-After however long, which `max_backoff` does not cap), bounded by `reconnect_timeout` seconds
    without a connection."""

    def __init__(self, path: str, *, request_id: str | None, after: int | None, reconnect_timeout: float,
                 max_backoff: float, on_reconnect: Callable[[Exception, float], None] | None) -> None:
        self.path = path
        self.request_id = request_id
        self.last_id = after
        self.ended = False
        self.reconnect_timeout = reconnect_timeout
        self.max_backoff = max_backoff
        self.on_reconnect = on_reconnect
        self.failing_since: float | None = None
        self.delay = 0.0
        self.was_connected = False  # a stream of this call was open once

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": str(self.last_id)} if self.last_id is not None else {}

    def connected(self) -> None:
        self.failing_since = None
        self.was_connected = True

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The event to yield, or None for one already seen (ids only increase; a server never resends
        one, but a client that says "none twice" checks)."""
        try:
            event_id = int(sse.id)
        except (TypeError, ValueError):
            return None  # not a log event (the API sends none without an id)
        if self.last_id is not None and event_id <= self.last_id:
            return None
        data = _event_data(sse, self.request_id) if sse.data else {}  # before the cursor moves past it
        if not isinstance(data, dict):
            raise SluicegateError(200, "bad_event", f"an event whose data is not a JSON object (id {event_id}, "
                                  f"{sse.event}): {_one_line(sse.data.encode())}", request_id=self.request_id)
        self.last_id = event_id
        self.delay = 0.0  # progress: the next drop starts the backoff afresh
        event = Event(sse.event, event_id, data)
        if self.request_id is not None and event.terminal and event.request_id in (self.request_id, None):
            self.ended = True
        return event

    def refused(self, response: httpx.Response, body: bytes) -> _Retry:
        """A non-200 answer: a reconnect for a server down or busy (5xx), and for a 429 once a stream of
        this call was open (the server may still count the connection that vanished: `max_streams`;
        its Retry-After is waited); raised at once otherwise."""
        error = _error_from(response, body)
        if _retried(response.status_code) or (response.status_code == 429 and self.was_connected):
            return _Retry(error)
        raise error

    def backoff(self, error: Exception) -> float:
        """Seconds to wait before the next attempt; raises StreamUnavailable once out of time."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        elapsed = now - self.failing_since
        if elapsed >= self.reconnect_timeout:
            if isinstance(error, SluicegateError) and error.status is not None:
                raise StreamUnavailable(error.status, error.code, f"gave up after {elapsed:.1f} s: {error.message}",
                                        error.body) from error
            raise StreamUnavailable(None, "unreachable", f"{self.path}: gave up reconnecting after {elapsed:.1f} s: "
                                    f"{type(error).__name__}: {error}") from error
        self.delay = min(self.max_backoff, max(0.05, self.delay * 2))
        wait = self.delay * random.uniform(0.5, 1.0)
        retry_after = error.retry_after if isinstance(error, SluicegateError) else None
        if retry_after:  # in full: sooner, the server refuses again (a 429 still counts the vanished stream)
            wait = max(wait, retry_after)
        wait = min(wait, max(0.0, self.reconnect_timeout - elapsed))
        if self.on_reconnect is not None:
            self.on_reconnect(error, wait)
        return wait


class _Base:
    """Configuration and request building common to both clients."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 stream_read_timeout: float = 60.0, reconnect_timeout: float = 60.0, max_backoff: float = 2.0,
                 chat_timeout: float | None = None) -> None:
        self.url = _base_url(url or os.environ.get("SLUICEGATE_URL") or DEFAULT_URL)
        self.shown_url = _shown_url(self.url)  # what messages name: the URL without its userinfo's password
        self.api_key = _api_key(api_key if api_key is not None else (os.environ.get("SLUICEGATE_API_KEY") or None))
        self.timeout = timeout
        # Idle SSE streams get a keep-alive comment every --sse-ping-seconds (15 s by default): a read
        # silent for longer than this is a dead connection (a host gone without a FIN), so reconnect.
        self.stream_timeout = httpx.Timeout(timeout, read=stream_read_timeout)
        # A non-streamed chat's answer is written only once its request ends (queue wait plus generation),
        # with nothing before it: no read timeout unless `chat_timeout` is given, as a timeout would raise
        # while the request runs on (and a retry would generate it twice).
        self.chat_timeout = httpx.Timeout(timeout, read=chat_timeout)
        self.reconnect_timeout = reconnect_timeout
        self.max_backoff = max_backoff

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": "sluicegate-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _follow(self, session_id: str | None, request_id: str | None, after: int | None,
                reconnect_timeout: float | None, on_reconnect: Callable[[Exception, float], None] | None) -> _Follow:
        if (session_id is None) == (request_id is None):
            raise ValueError("give exactly one of session_id or request_id")
        path = (f"/v1/requests/{_quoted(request_id)}/events" if request_id is not None
                else f"{_session_path(str(session_id))}/events")
        return _Follow(path, request_id=request_id, after=after, max_backoff=self.max_backoff,
                       reconnect_timeout=self.reconnect_timeout if reconnect_timeout is None else reconnect_timeout,
                       on_reconnect=on_reconnect)


def _base_url(url: str) -> str:
    """`url` without its trailing `/`, or InvalidArgument for one httpx cannot send to: with no http(s)
    scheme (`localhost:8000`) or no host, every call would fail as if sent (`no_answer`, and a stream
    would retry it for its whole reconnect_timeout) though nothing can ever be sent. No message quotes
    more of a URL that does not parse, or has an `@` past its userinfo, than its scheme and host: httpx's own
    message (`Invalid port: 'hunter2'`) or the whole text would name a password with `/`, `?` or `#` in it."""
    _, sep, rest = url.partition("://")
    after = rest if sep else url
    if "@" in after[_authority_end(after):]:
        # `http://alice:pa/ss@host`: httpx ends the userinfo's authority at the `/` (host `alice`, port `pa`)
        raise InvalidArgument(422, "invalid_request", f"url {_outline(url)!r}: an @ past the end of its host "
                              "(a / ? or # ends it): a password with / ? # or @ in it must be percent-encoded (%2F "
                              "%3F %23 %40)")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:  # its message quotes the part it refused, which may be the password
        fault = re.split(r": |, ", str(error), maxsplit=1)[0]  # what is wrong, before what it quotes
        raise InvalidArgument(422, "invalid_request", f"url {_outline(url)!r}: does not parse ({fault})") from None
    shown = _shown_url(url)
    if parsed.scheme not in ("http", "https"):
        hint = "http://" + shown.split("://", 1)[-1]
        raise InvalidArgument(422, "invalid_request", f"url {shown!r}: not an http:// or https:// URL (did you "
                              f"mean {hint!r}?)")
    if not parsed.host:
        raise InvalidArgument(422, "invalid_request", f"url {shown!r}: no host (e.g. {DEFAULT_URL!r})")
    return url.rstrip("/")


def _authority_end(rest: str) -> int:
    """Where the authority of `rest` (a URL past its `scheme://`) ends: its first `/`, `?` or `#`, as httpx
    parses it."""
    return min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))


def _outline(url: str) -> str:
    """A URL refused before it parsed, as its message may name it: its scheme and the host after its last `@`,
    nothing else (`http://...@127.0.0.1:9`)."""
    scheme, sep, rest = url.partition("://")
    shown_scheme = "" if not sep else f"{scheme}://" if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else "...://"
    tail = (rest if sep else url).rsplit("@", 1)
    host = tail[-1][:_authority_end(tail[-1])]
    return f"{shown_scheme}{'...@' if len(tail) > 1 else ''}{host}"


def _shown_url(url: str) -> str:
    """`url` as a message may name it: its userinfo (`http://bob:secret@host`, sent as Basic auth) left out,
    since messages end up on terminals, in logs and in an assistant's context."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = _authority_end(rest)
    authority = rest[:end]
    if "@" not in authority:
        return url
    return f"{scheme}{sep}{authority.rsplit('@', 1)[1]}{rest[end:]}"


_NEVER_IN_A_HEADER = frozenset("\0\r\n\x0b\x0c")  # h11's header value: no NUL, no whitespace but a space or tab


def _api_key(key: str | None) -> str | None:
    """`key`, or InvalidArgument for one an HTTP header cannot carry, by h11's rule for a header value: a line
    end (pasted with it, or read from a file with its newline), a NUL, a vertical tab or form feed, a space or
    tab at either end, or a non-ASCII character (httpx writes headers as ASCII). h11 would refuse the header
    with a message that quotes it, on every call and every reconnect; the message here does not quote it. A
    space or tab inside is carried: a passphrase (`correct horse battery staple`) is a key the server takes."""
    if not key:
        return key
    faults = [(i, "a non-ASCII character" if not c.isascii() else "a line end" if c in "\r\n" else "a NUL"
               if c == "\0" else "a vertical tab or form feed") for i, c in enumerate(key)
              if not c.isascii() or c in _NEVER_IN_A_HEADER]
    if key[0] in " \t":
        faults.append((0, "a space or tab at its start"))
    if key[-1] in " \t":
        faults.append((len(key) - 1, "a space or tab at its end"))
    if not faults:
        return key
    where, what = min(faults, key=lambda fault: fault[0])
    raise InvalidArgument(422, "invalid_request", f"the API key (--api-key / SLUICEGATE_API_KEY) has a character "
                          f"a header cannot carry at position {where} of {len(key)}: {what} (a space inside is "
                          "carried; a line end, a NUL, a non-ASCII character or a space at either end is not)")


def _submitted(payload: dict[str, Any]) -> Submitted:
    return Submitted(request_id=payload["request_id"], session_id=payload["session_id"],
                     events_url=payload.get("events_url", ""), status=payload.get("status", "queued"), raw=payload)


# ---- streamed chat --------------------------------------------------------------------------------
def _cut(error: httpx.TransportError, url: str, request_id: str | None) -> SluicegateError:
    """A chat stream whose connection failed: `no_answer`, with the request's id (its events stay readable)."""
    cut = _unreachable(error, url)
    cut.request_id = request_id
    return cut


def _read_chunks(response: httpx.Response, url: str,
                 request_id: str | None) -> Generator[dict[str, Any], None, None]:
    """Yields {} once (entered), then the chunks; closes the response however it ends."""
    try:
        yield {}
        for sse in EventSource(response).iter_sse():
            chunk = _chunk(sse, request_id)
            if chunk is None:
                return
            yield chunk
    except SSEError as error:  # before TransportError, which httpx-sse's SSEError subclasses
        raise _not_an_event_stream(error, request_id) from error
    except httpx.DecodingError as error:  # a RequestError, not a TransportError
        raise _undecodable(response, error, request_id) from error
    except httpx.TransportError as error:
        raise _cut(error, url, request_id) from error
    finally:
        response.close()


async def _aread_chunks(response: httpx.Response, url: str,
                        request_id: str | None) -> AsyncGenerator[dict[str, Any], None]:
    """As _read_chunks."""
    try:
        yield {}
        async for sse in EventSource(response).aiter_sse():
            chunk = _chunk(sse, request_id)
            if chunk is None:
                return
            yield chunk
    except SSEError as error:  # before TransportError, which httpx-sse's SSEError subclasses
        raise _not_an_event_stream(error, request_id) from error
    except httpx.DecodingError as error:  # as in _read_chunks
        raise _undecodable(response, error, request_id) from error
    except httpx.TransportError as error:
        raise _cut(error, url, request_id) from error
    finally:
        await response.aclose()


class ChatStream:
    """A streamed chat: iterate it for the `chat.completion.chunk` dicts. It owns an open response: read it
    to its end, `close()` it or use it as a context manager; one dropped unread is closed when collected.
    `request_id` and `session_id` come from the answer's headers (`X-Request-Id`, `X-Session-Id`): a cut
    stream is not resumed, `stream(request_id=...)` reads the rest."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self.response = response
        self.request_id: str | None = response.headers.get("x-request-id")
        self.session_id: str | None = response.headers.get("x-session-id")
        # Entered before it is handed out (the generator holds no reference back to self): its finally closes
        # the response however it ends, also when the stream is dropped unread.
        self._chunks = _read_chunks(response, url, self.request_id)
        next(self._chunks)

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncChatStream:
    """As ChatStream, for `async for`: `await aclose()` or `async with` it. One dropped unread is closed by
    its event loop (asyncio finalizes the entered async generator that owns the response)."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self.response = response
        self.request_id: str | None = response.headers.get("x-request-id")
        self.session_id: str | None = response.headers.get("x-session-id")
        self._chunks = _aread_chunks(response, url, self.request_id)

    @classmethod
    async def open(cls, response: httpx.Response, url: str) -> AsyncChatStream:
        stream = cls(response, url)
        await anext(stream._chunks)  # entered, as in ChatStream
        return stream

    def __aiter__(self) -> AsyncChatStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await anext(self._chunks)

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


# ---- sync -----------------------------------------------------------------------------------------
class Client(_Base):
    """A blocking client; use it as a context manager (or call close()) to release its connections."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 stream_read_timeout: float = 60.0, reconnect_timeout: float = 60.0, max_backoff: float = 2.0,
                 chat_timeout: float | None = None, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout, stream_read_timeout=stream_read_timeout,
                         reconnect_timeout=reconnect_timeout, max_backoff=max_backoff, chat_timeout=chat_timeout)
        self.http = httpx.Client(base_url=self.url, headers=self._headers(), timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, *, json_body: Any = None, params: Mapping[str, Any] | None = None,
              headers: Mapping[str, str] | None = None, timeout: Any = httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        """A 2xx answer, its body read; raises the SluicegateError of any other (a 3xx too), of a body that
        does not decode, or of no answer."""
        request = self.http.build_request(method, path, json=json_body, params=params, headers=headers,
                                          timeout=timeout)
        try:
            response = self.http.send(request, stream=True)
            try:
                response.read()
            except httpx.DecodingError as error:  # a RequestError, not a TransportError
                raise _undecodable(response, error) from error
            finally:
                response.close()
        except httpx.TransportError as error:
            raise _unreachable(error, self.shown_url + path) from error
        if not _success(response):
            raise _error_from(response, response.content)
        return response

    def _call(self, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None,
              shape: Shape = ANY_OBJECT) -> dict[str, Any]:
        response = self._send(method, path, json_body=_json_safe(body), params=params)
        return _shaped(response, _json_of(response), shape)

    # requests
    def submit(self, session_id: str, prompt: str | Sequence[Mapping[str, Any]], *, max_tokens: int | None = None,
               priority: Priority | None = None, tenant: str | None = None, group: str | None = None,
               params: Mapping[str, Any] | None = None, deadline_ms: int | None = None,
               on_deadline_miss: str | None = None, callback_url: str | None = None) -> Submitted:
        """Queue a request in the session (`prompt` is a string, or a list of chat messages)."""
        body = _submit_body(prompt, max_tokens, priority, tenant, group, params, deadline_ms, on_deadline_miss,
                            callback_url)
        return _submitted(self._call("POST", f"{_session_path(session_id)}/requests", body, shape=SUBMITTED))

    def request(self, request_id: str, *, include_output: bool = False) -> dict[str, Any]:
        """Status, tokens so far and timestamps (with `include_output`, the text so far too)."""
        params = {"include": "output"} if include_output else None
        return self._call("GET", f"/v1/requests/{_quoted(request_id)}", params=params, shape=REQUEST)

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/requests/{_quoted(request_id)}", shape=REQUEST)

    def stream(self, *, session_id: str | None = None, request_id: str | None = None, after: int | None = None,
               reconnect_timeout: float | None = None,
               on_reconnect: Callable[[Exception, float], None] | None = None) -> Iterator[Event]:
        """The events of a request (ends after its terminal event) or of a session (never ends by itself),
        after the event id `after` when given; reconnects and resumes by itself (see the module doc)."""
        follow = self._follow(session_id, request_id, after, reconnect_timeout, on_reconnect)
        while not follow.ended:
            try:
                with connect_sse(self.http, "GET", follow.path, headers=follow.headers(),
                                 timeout=self.stream_timeout) as source:
                    response = source.response
                    if response.status_code == 204:  # a request's stream resumed at or past its terminal event
                        return
                    if response.status_code != 200:
                        raise follow.refused(response, _error_body(response))
                    follow.connected()
                    try:
                        for sse in source.iter_sse():
                            event = follow.accept(sse)
                            if event is not None:
                                yield event
                                if follow.ended:
                                    return
                    except httpx.DecodingError as error:  # retried as a 5xx is: a proxy's mangling may pass
                        raise _Retry(_undecodable(response, error)) from error
                    raise _Retry(ConnectionError("the stream ended before its terminal event"))
            except SSEError as error:  # first: it is a TransportError too, which would be retried for ever
                raise _not_an_event_stream(error) from error
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as error:  # never sent: retrying is no use
                raise _unreachable(error, self.shown_url + follow.path) from error
            except (_Retry, httpx.TransportError) as error:
                cause = error.error if isinstance(error, _Retry) else error
                time.sleep(follow.backoff(cause))

    # OpenAI-compatible chat
    @overload
    def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = ..., stream: Literal[False] = ...,
             session_id: str | None = ..., priority: Priority | None = ..., tenant: str | None = ...,
             group: str | None = ..., max_tokens: int | None = ..., deadline_ms: int | None = ...,
             callback_url: str | None = ..., **extra: Any) -> dict[str, Any]: ...

    @overload
    def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = ..., stream: Literal[True],
             session_id: str | None = ..., priority: Priority | None = ..., tenant: str | None = ...,
             group: str | None = ..., max_tokens: int | None = ..., deadline_ms: int | None = ...,
             callback_url: str | None = ..., **extra: Any) -> ChatStream: ...

    def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None, stream: bool = False,
             session_id: str | None = None, priority: Priority | None = None, tenant: str | None = None,
             group: str | None = None, max_tokens: int | None = None, deadline_ms: int | None = None,
             callback_url: str | None = None, **extra: Any) -> dict[str, Any] | ChatStream:
        """POST /v1/chat/completions: the `chat.completion` dict (waited for as long as its request takes,
        unless the client's `chat_timeout` is set), or with `stream=True` a `ChatStream` of
        `chat.completion.chunk` dicts (opened before this returns, so a refused call raises here; close it,
        or read it to its end, to free its connection; a dropped chat stream is not resumed: follow its
        `request_id` with stream() for that). Other OpenAI fields (temperature, tools, ...) go in `extra`."""
        body, headers = _chat_call(messages, model, stream, session_id, priority, tenant, group, max_tokens,
                                   deadline_ms, callback_url, extra)
        if not stream:
            response = self._send("POST", "/v1/chat/completions", json_body=body, headers=headers,
                                  timeout=self.chat_timeout)
            payload = _json_of(response)
            failed = _body_error(payload, response.headers.get("x-request-id"))
            if failed is not None:
                raise failed
            return _shaped(response, payload, CHAT)
        request = self.http.build_request("POST", "/v1/chat/completions", json=body,
                                          headers={**headers, "Accept": "text/event-stream"},
                                          timeout=self.stream_timeout)
        try:
            response = self.http.send(request, stream=True)
        except httpx.TransportError as error:
            raise _unreachable(error, self.shown_url + "/v1/chat/completions") from error
        if not _success(response):
            try:
                raise _error_from(response, _error_body(response))
            finally:
                response.close()
        return ChatStream(response, self.shown_url + "/v1/chat/completions")

    # admin (the admin key when auth is on)
    def set_quota(self, group: str, *, requests_per_second: float | None = KEEP, tokens_per_second: float | None = KEEP,
                  burst: int | None = KEEP, max_concurrency: int | None = KEEP, burst_tokens: float | None = KEEP,
                  model: str | None = KEEP) -> dict[str, Any]:
        """Set a group's quota fields: the ones not given are kept, None removes a limit (unlimited)."""
        fields = _admin_fields(requests_per_second=requests_per_second, tokens_per_second=tokens_per_second,
                               burst=burst, max_concurrency=max_concurrency, burst_tokens=burst_tokens, model=model)
        return self._call("PUT", f"/v1/admin/groups/{_quoted(group)}", fields, shape=GROUP)

    def set_weight(self, tenant: str, weight: float) -> dict[str, Any]:
        """A tenant's fair-share weight (default 1.0)."""
        return self._call("PUT", f"/v1/admin/tenants/{_quoted(tenant)}", {"weight": weight}, shape=TENANT)

    def set_tenant(self, tenant: str, *, weight: float = KEEP, max_priority: Priority | None = KEEP,
                   max_streams: int | None = KEEP, **limits: Any) -> dict[str, Any]:
        """A tenant's weight and guardrails: fields not given are kept, None goes back to the default."""
        fields = _admin_fields(weight=weight, max_priority=max_priority, max_streams=max_streams, **limits)
        return self._call("PUT", f"/v1/admin/tenants/{_quoted(tenant)}", fields, shape=TENANT)

    def groups(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/admin/groups", shape=GROUPS)["groups"]

    def tenants(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/admin/tenants", shape=TENANTS)["tenants"]

    def stats(self) -> dict[str, Any]:
        """Queue depth by group, priority and tenant; running; workers; quotas; tenants."""
        return self._call("GET", "/v1/admin/stats", shape=STATS)


# ---- async ----------------------------------------------------------------------------------------
class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same methods, awaited; `stream()` and a streamed `chat()` are
    async iterators. Use `async with` (or `await aclose()`)."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 stream_read_timeout: float = 60.0, reconnect_timeout: float = 60.0, max_backoff: float = 2.0,
                 chat_timeout: float | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout, stream_read_timeout=stream_read_timeout,
                         reconnect_timeout=reconnect_timeout, max_backoff=max_backoff, chat_timeout=chat_timeout)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self._headers(), timeout=timeout,
                                      transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, path: str, *, json_body: Any = None,
                    params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
                    timeout: Any = httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        """As Client._send."""
        request = self.http.build_request(method, path, json=json_body, params=params, headers=headers,
                                          timeout=timeout)
        try:
            response = await self.http.send(request, stream=True)
            try:
                await response.aread()
            except httpx.DecodingError as error:
                raise _undecodable(response, error) from error
            finally:
                await response.aclose()
        except httpx.TransportError as error:
            raise _unreachable(error, self.shown_url + path) from error
        if not _success(response):
            raise _error_from(response, response.content)
        return response

    async def _call(self, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None,
                    shape: Shape = ANY_OBJECT) -> dict[str, Any]:
        response = await self._send(method, path, json_body=_json_safe(body), params=params)
        return _shaped(response, _json_of(response), shape)

    async def submit(self, session_id: str, prompt: str | Sequence[Mapping[str, Any]], *,
                     max_tokens: int | None = None, priority: Priority | None = None, tenant: str | None = None,
                     group: str | None = None, params: Mapping[str, Any] | None = None,
                     deadline_ms: int | None = None, on_deadline_miss: str | None = None,
                     callback_url: str | None = None) -> Submitted:
        body = _submit_body(prompt, max_tokens, priority, tenant, group, params, deadline_ms, on_deadline_miss,
                            callback_url)
        return _submitted(await self._call("POST", f"{_session_path(session_id)}/requests", body, shape=SUBMITTED))

    async def request(self, request_id: str, *, include_output: bool = False) -> dict[str, Any]:
        params = {"include": "output"} if include_output else None
        return await self._call("GET", f"/v1/requests/{_quoted(request_id)}", params=params, shape=REQUEST)

    async def cancel(self, request_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/v1/requests/{_quoted(request_id)}", shape=REQUEST)

    async def stream(self, *, session_id: str | None = None, request_id: str | None = None, after: int | None = None,
                     reconnect_timeout: float | None = None,
                     on_reconnect: Callable[[Exception, float], None] | None = None) -> AsyncIterator[Event]:
        """As Client.stream()."""
        follow = self._follow(session_id, request_id, after, reconnect_timeout, on_reconnect)
        while not follow.ended:
            try:
                async with aconnect_sse(self.http, "GET", follow.path, headers=follow.headers(),
                                        timeout=self.stream_timeout) as source:
                    response = source.response
                    if response.status_code == 204:  # as in Client.stream
                        return
                    if response.status_code != 200:
                        raise follow.refused(response, await _aerror_body(response))
                    follow.connected()
                    try:
                        async for sse in source.aiter_sse():
                            event = follow.accept(sse)
                            if event is not None:
                                yield event
                                if follow.ended:
                                    return
                    except httpx.DecodingError as error:  # as in Client.stream()
                        raise _Retry(_undecodable(response, error)) from error
                    raise _Retry(ConnectionError("the stream ended before its terminal event"))
            except SSEError as error:  # first, as in Client.stream()
                raise _not_an_event_stream(error) from error
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as error:  # as in Client.stream()
                raise _unreachable(error, self.shown_url + follow.path) from error
            except (_Retry, httpx.TransportError) as error:
                cause = error.error if isinstance(error, _Retry) else error
                await asyncio.sleep(follow.backoff(cause))

    @overload
    async def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = ...,
                   stream: Literal[False] = ..., session_id: str | None = ..., priority: Priority | None = ...,
                   tenant: str | None = ..., group: str | None = ..., max_tokens: int | None = ...,
                   deadline_ms: int | None = ..., callback_url: str | None = ..., **extra: Any) -> dict[str, Any]: ...

    @overload
    async def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = ..., stream: Literal[True],
                   session_id: str | None = ..., priority: Priority | None = ..., tenant: str | None = ...,
                   group: str | None = ..., max_tokens: int | None = ..., deadline_ms: int | None = ...,
                   callback_url: str | None = ..., **extra: Any) -> AsyncChatStream: ...

    async def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None, stream: bool = False,
                   session_id: str | None = None, priority: Priority | None = None, tenant: str | None = None,
                   group: str | None = None, max_tokens: int | None = None, deadline_ms: int | None = None,
                   callback_url: str | None = None,
                   **extra: Any) -> dict[str, Any] | AsyncChatStream:
        """As Client.chat(); a streamed one is an `AsyncChatStream` (`aclose()` or `async with`)."""
        body, headers = _chat_call(messages, model, stream, session_id, priority, tenant, group, max_tokens,
                                   deadline_ms, callback_url, extra)
        path = "/v1/chat/completions"
        if not stream:
            response = await self._send("POST", path, json_body=body, headers=headers, timeout=self.chat_timeout)
            payload = _json_of(response)
            failed = _body_error(payload, response.headers.get("x-request-id"))
            if failed is not None:
                raise failed
            return _shaped(response, payload, CHAT)
        request = self.http.build_request("POST", path, json=body, headers={**headers, "Accept": "text/event-stream"},
                                          timeout=self.stream_timeout)
        try:
            response = await self.http.send(request, stream=True)
        except httpx.TransportError as error:
            raise _unreachable(error, self.shown_url + path) from error
        if not _success(response):
            try:
                raise _error_from(response, await _aerror_body(response))
            finally:
                await response.aclose()
        return await AsyncChatStream.open(response, self.shown_url + path)

    async def set_quota(self, group: str, *, requests_per_second: float | None = KEEP,
                        tokens_per_second: float | None = KEEP, burst: int | None = KEEP,
                        max_concurrency: int | None = KEEP, burst_tokens: float | None = KEEP,
                        model: str | None = KEEP) -> dict[str, Any]:
        fields = _admin_fields(requests_per_second=requests_per_second, tokens_per_second=tokens_per_second,
                               burst=burst, max_concurrency=max_concurrency, burst_tokens=burst_tokens, model=model)
        return await self._call("PUT", f"/v1/admin/groups/{_quoted(group)}", fields, shape=GROUP)

    async def set_weight(self, tenant: str, weight: float) -> dict[str, Any]:
        return await self._call("PUT", f"/v1/admin/tenants/{_quoted(tenant)}", {"weight": weight}, shape=TENANT)

    async def set_tenant(self, tenant: str, *, weight: float = KEEP, max_priority: Priority | None = KEEP,
                         max_streams: int | None = KEEP, **limits: Any) -> dict[str, Any]:
        fields = _admin_fields(weight=weight, max_priority=max_priority, max_streams=max_streams, **limits)
        return await self._call("PUT", f"/v1/admin/tenants/{_quoted(tenant)}", fields, shape=TENANT)

    async def groups(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/admin/groups", shape=GROUPS))["groups"]

    async def tenants(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/admin/tenants", shape=TENANTS))["tenants"]

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/admin/stats", shape=STATS)
