"""The client's errors, and the building of one from what went wrong: an error answer (the API's JSON error
body, or a proxy's page; a 3xx too, as redirects are not followed), a body that does not decode, a 200 that
is no event stream, a failure reported inside a 200, or no answer at all. Every failure the client raises is
a `SluicegateError`, so a caller catches one class; its message never names the API key or a URL's
password."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx
from httpx_sse import SSEError

from sluicegate.client.shown_urls import _shown_url


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
    cannot carry (a line end, a NUL or other control character, DEL, a non-ASCII character, a space or tab at
    either end; a space inside is carried) (raised by the constructor). Also a ValueError, which such calls raised
    before."""


class CursorExpired(SluicegateError):
    """409 `cursor_expired`: the session's log was trimmed past the resume cursor (the message names the
    oldest kept id). Resuming silently without a cursor would skip events, so the caller decides."""


class StreamUnavailable(SluicegateError):
    """A stream could not be (re)connected within `reconnect_timeout` seconds."""


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


def _cut(error: httpx.TransportError, url: str, request_id: str | None) -> SluicegateError:
    """A chat stream whose connection failed: `no_answer`, with the request's id (its events stay readable)."""
    cut = _unreachable(error, url)
    cut.request_id = request_id
    return cut


def _body_error(payload: Any, request_id: str | None = None) -> SluicegateError | None:
    """A failure reported inside a 200 (a chat answer whose status went out before it ended)."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        # the failure's `status` (its `code` is the type since 2026-12-06), or an older server's integer code
        status = next((v for v in (error.get("status"), error.get("code")) if isinstance(v, int)), None)
        return SluicegateError(status, str(error.get("type") or "error"), str(error.get("message") or ""), payload,
                               request_id=request_id)
    return None
