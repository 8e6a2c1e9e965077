"""Push mode at the API: a submit's `callback_url` (chat: `X-Callback-Url`) is checked against
--webhook-allow before anything is stored, and noted on the request right after its submit
(sessions/callbacks.py; webhooks/delivery.py sends it)."""

from __future__ import annotations

import asyncio

import httpx
from redis.exceptions import TimeoutError as RedisTimeoutError

from sluicegate.api.errors import ApiError
from sluicegate.api.services import Services
from sluicegate.sessions import callbacks

MAX_URL = 2048
ATTACH_SECONDS = 3.0  # a short script: a store that has not answered it by then is stalled


def check_callback(svc: Services, url: str | None) -> str | None:
    """The URL when given and allowed; 422 `callback_not_allowed` for any host not in --webhook-allow, or a URL
    that is not a sendable http(s) one."""
    if url is None or url == "":
        return None
    if len(url) > MAX_URL or callbacks.callback_host(url) is None or not sendable(url):
        raise ApiError(422, f"callback_url: an http(s) URL of at most {MAX_URL} characters", "callback_not_allowed")
    if not callbacks.callback_allowed(url, svc.settings.webhook_hosts()):
        raise ApiError(422, f"callback_url: host {callbacks.callback_host(url)!r} is not in --webhook-allow",
                       "callback_not_allowed")
    return url


def sendable(url: str) -> bool:
    """Whether delivery can send to `url`: urlsplit (callback_host) silently drops tabs and newlines, and
    leading spaces, but httpx refuses any control character and reads " http://host/" as a relative URL (no
    host: UnsupportedProtocol), so such a URL would pass here and fail at every delivery attempt. A lone
    surrogate (valid JSON: "\\ud800") is no character UTF-8 can encode: httpx raises UnicodeEncodeError."""
    if url != url.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return False
    try:
        return bool(httpx.URL(url).host)
    except (httpx.InvalidURL, UnicodeError):
        return False


async def attach_callback(svc: Services, request_id: str, url: str | None) -> None:
    """Note the checked callback on the stored request (its delivery is queued when it ends). The routes lift
    the response deadline before it (the request is stored), so a store that stalls here is bounded by
    ATTACH_SECONDS instead: a redis TimeoutError, the stored request's 503, never a hang of the socket timeouts."""
    if url is None:
        return
    try:
        async with asyncio.timeout(ATTACH_SECONDS):
            await callbacks.attach(svc.redis, request_id, url)
    except TimeoutError as error:  # redis-py dropped the connection of the cancelled call
        raise RedisTimeoutError(f"noting the callback took over {ATTACH_SECONDS:g} s") from error
