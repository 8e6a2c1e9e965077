"""Following an event stream, apart from its I/O: the resume cursor, when the stream ends, which failures
are retried, and the retry budget (a jittered backoff, and `reconnect_timeout` seconds without a connection
before `StreamUnavailable`). `Client.stream()` and `AsyncClient.stream()` hold only their sync and async I/O
around it, so both resume and give up alike."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import httpx
from httpx_sse import ServerSentEvent

from sluicegate.client.answers import Event, _event_data
from sluicegate.client.errors import SluicegateError, StreamUnavailable, _error_from, _one_line

NEVER_HEALS = frozenset({501, 505})  # the 5xx a retry cannot change; every other 5xx is retried (a proxy's 520-524 too)


def _retried(status: int) -> bool:
    """A 5xx: the server, or a proxy in front of it, is down, restarting or busy (501 and 505 never heal)."""
    return 500 <= status <= 599 and status not in NEVER_HEALS


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
        self.budget_before: float | None = None  # failing_since before the current answer's 200
        self.delivered = False  # the current answer delivered an event (it is an event stream)

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": str(self.last_id)} if self.last_id is not None else {}

    def connected(self) -> None:
        """A 200: the reconnect budget starts afresh, unless the answer proves unreadable (see unreadable)."""
        self.budget_before, self.failing_since = self.failing_since, None
        self.was_connected = True
        self.delivered = False

    def unreadable(self, error: SluicegateError) -> _Retry:
        """A 200 that failed before it delivered an event (a body that does not decode, an empty one) was no
        connection: the budget runs on from the failure before it, so a stream whose every 200 is such gives up
        after `reconnect_timeout` seconds (StreamUnavailable with this error's code) as one answered only 5xx
        does; the 200 had started the budget afresh, and such a stream reconnected for ever."""
        if not self.delivered:
            self.failing_since = self.budget_before
        return _Retry(error)

    def cut_short(self, response: httpx.Response) -> _Retry:
        """A 200 that ended before the request's terminal event (a session's stream never ends): a dropped
        connection, reconnected; one that ended with no byte at all is an unreadable answer (not the API's
        stream: an idle stream of the API has its keep-alive comments)."""
        if response.num_bytes_downloaded == 0:
            return self.unreadable(SluicegateError(200, "not_an_event_stream", "an empty 200 answer (the stream "
                                                   "ended before any byte of it came)",
                                                   request_id=response.headers.get("x-request-id")))
        return _Retry(ConnectionError("the stream ended before its terminal event"))

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The event to yield, or None for one already seen (ids only increase; a server never resends
        one, but a client that says "none twice" checks)."""
        self.delivered = True
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
