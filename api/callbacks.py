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
    delivery cannot send (`unsendable`), the message naming why."""
    if url is None or url == "":
        return None
    why = unsendable(url)
    if why is not None:
        raise ApiError(422, f"callback_url: {why}", "callback_not_allowed")
    if not callbacks.callback_allowed(url, svc.settings.webhook_hosts()):
        raise ApiError(422, f"callback_url: host {callbacks.callback_host(url)!r} is not in --webhook-allow",
                       "callback_not_allowed")
    return url


def unsendable(url: str) -> str | None:
    """Why delivery could not send to `url` (None: it can). urlsplit (callback_host) silently drops tabs and
    newlines, and leading spaces, but httpx refuses any control character and reads " http://host/" as a
    relative URL (no host: UnsupportedProtocol), so such a URL would pass the host check and fail at every
    delivery attempt. Spaces elsewhere, a trailing one or a Unicode one (NBSP, U+3000) included, httpx sends
    percent-encoded: those are taken. A lone surrogate (valid JSON: "\\ud800") is no character UTF-8 can
    encode: httpx raises UnicodeEncodeError."""
    if len(url) > MAX_URL:
        return f"longer than {MAX_URL} characters"
    control = next((c for c in url if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if control is not None:
        return f"holds a control character (U+{ord(control):04X})"
    if url[0].isspace():
        return f"starts with a space (U+{ord(url[0]):04X})"
    if callbacks.callback_host(url) is None:
        return "not an http(s) URL with a host (and a numeric port, if any)"
    try:
        host = httpx.URL(url).host
    except UnicodeError:
        return "holds a character UTF-8 cannot encode (a lone surrogate)"
    except httpx.InvalidURL as error:
        return f"not a URL the delivery can send ({error})"[:300]
    return None if host else "no host the delivery can send to"


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
