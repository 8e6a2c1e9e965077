"""What the sync and async clients share: their configuration (URL, API key, timeouts, the reconnect
budget), the headers every call carries, and the start of a `stream()` call. `Client` and `AsyncClient` add
only their transport and their calls."""

from __future__ import annotations

import os
from collections.abc import Callable

import httpx

from sluicegate.client.addresses import DEFAULT_URL, _api_key, _base_url, _quoted, _session_path
from sluicegate.client.follow import _Follow
from sluicegate.client.shown_urls import _shown_url


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
