"""Callbacks of ended requests (push mode): what the API notes at submit and the delivery process
(webhooks/delivery.py) works through.

A submit with a `callback_url` notes it in the request hash (`cb`). When the request ends, its terminal
step queues the delivery in its bucket's `cb` zset (sessions/lua/includes/ended.lua), in the same atomic
call as the end itself: nothing is lost between the two, and the entry shares the request's hash tag
(cluster-safe). The delivery process claims a due entry for one attempt (the entry stays queued, due
again after a lease, so a crash loses nothing) and settles it: delivered, failed, or due again later.
The request hash records the outcome (`cbs`, `cbn` attempts, `cbe` last error) until it expires; a
callback still queued (being retried, or waiting for its receiver's host) keeps it past its session's TTL:
until it is due and the longer of a lease and that TTL more, so that a delivery outage shorter than the TTL
around its due time loses nothing. Its last attempt settled, the request is kept a lease more, or until its
own expiry (the one it ended with, recorded as `cbx` before the first lengthening) when that is later.

A receiver that gives no attempt a timely success (each is cut at --webhook-timeout, or fails only after a host
turns slow, or fails while its host's places are all taken) is noted silent in one small hash
(`keys.CALLBACKS_SILENT`, keyed by the callback URL's origin, `callback_origin`: -> since when, and when its last
such attempt ended), written by every delivery process; a success, or another failure, deletes it (a note whose
silence is over is deleted when read). A callback of a silent origin that waits for a place of its host, silent for
a whole retry schedule, is failed unsent (`give_up`): what bounds a dead receiver's backlog. The origin, not the
host: another port or scheme of the same host is another receiver, whose callbacks a dead one must not fail (the
places stay per host: webhooks/rooms.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text

SCRIPTS = Path(__file__).parent / "lua" / "standalone"


@cache
def script(name: str) -> str:
    return (SCRIPTS / f"{name}.lua").read_text()


def _http_url(url: str) -> tuple[str, str, int | None] | None:
    """The scheme, host (lowercased) and port of an http(s) URL, or None when it is not one."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port  # raises on a bad port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    return parts.scheme, host.lower(), port


def callback_host(url: str) -> str | None:
    """The host an http(s) URL names (lowercased), or None when it is not one."""
    parsed = _http_url(url)
    return None if parsed is None else parsed[1]


def callback_origin(url: str) -> str | None:
    """The origin an http(s) URL names, "<scheme>://<host>:<port>" (host lowercased, the scheme's default port
    filled in), or None when it is not one: a callback's receiver, as its silence is noted."""
    parsed = _http_url(url)
    if parsed is None:
        return None
    scheme, host, port = parsed
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port or (443 if scheme == 'https' else 80)}"


def callback_allowed(url: str, hosts: Sequence[str]) -> bool:
    """Only hosts the operator listed (--webhook-allow) are ever called: at submit and before each delivery."""
    host = callback_host(url)
    return host is not None and host in hosts


def callback_view(fields: dict[str, str]) -> dict[str, Any] | None:
    """The `callback` of GET /v1/requests/{id}: pending until a delivery succeeded or the attempts ran out."""
    if "cb" not in fields:
        return None
    return {"url": fields["cb"], "status": fields.get("cbs", "pending"), "attempts": int(fields.get("cbn", 0)),
            "last_error": fields.get("cbe")}


async def attach(redis: Any, rid: str, url: str) -> bool:
    """Note the callback on a just-submitted request (queued at once if it ended already); False when the
    request does not exist."""
    reply = await redis.eval(script("callback_attach"), 2, keys.request(rid),
                             keys.callbacks_due(keys.bucket_of_request(rid)), rid, url, *keys.TERMINAL_STATUSES)
    return int(reply) == 1


class Expired(Exception):
    """The request of a due callback expired before an attempt could claim it (it is dropped)."""


def kept_past_due(lease_ms: int, session_ttl_ms: int) -> int:
    """How long a queued callback's request is kept past its due time: a lease (for the attempt's outcome),
    or its session's TTL when longer, so that a delivery process down for less than a TTL around that time
    (a restart, a deploy) still finds it."""
    return max(lease_ms, session_ttl_ms)


async def claim(redis: Any, rid: str, *, now_ms: int, lease_ms: int,
                session_ttl_ms: int) -> tuple[int, dict[str, str]] | None:
    """One delivery attempt of a due callback: (attempt number, the request's fields); None when it is
    not due. The entry is due again after the lease (a process that dies mid-attempt loses nothing), and its
    request kept until then and `kept_past_due` more. Raises Expired when its request expired (the entry is
    dropped)."""
    reply = await redis.eval(script("callback_claim"), 2, keys.callbacks_due(keys.bucket_of_request(rid)),
                             keys.request(rid), rid, now_ms, lease_ms, kept_past_due(lease_ms, session_ttl_ms))
    if reply is None:
        return None
    if not reply:
        raise Expired(rid)
    fields = {text(reply[i]): text(reply[i + 1]) for i in range(1, len(reply) - 1, 2)}
    return int(reply[0]), fields


async def push_back(redis: Any, due: dict[str, int], held: Iterable[str], *, now_ms: int, lease_ms: int,
                    session_ttl_ms: int = 0, kept: Iterable[str] = ()) -> None:
    """Callbacks that wait for their receiver's host, in one pipeline: each of `due` (request id -> ms) is
    due again then (only later, and only while still queued), each of `held` (due, and held by the delivery
    process for a place of its host) or `kept` (read while all its places were taken) stays due as it is; each
    one's request is kept until it is due and `kept_past_due` more, past its session's TTL if need be, so that
    a long backlog drops none of them."""
    waiting = [*due.items(), *((rid, 0) for rid in dict.fromkeys([*held, *kept]) if rid not in due)]
    if not waiting:
        return
    pipe = redis.pipeline(transaction=False)
    for rid, due_ms in waiting:
        pipe.eval(script("callback_push_back"), 2, keys.callbacks_due(keys.bucket_of_request(rid)), keys.request(rid),
                  rid, due_ms, now_ms, kept_past_due(lease_ms, session_ttl_ms))
    await pipe.execute()


async def settle(redis: Any, rid: str, attempt: int, outcome: str, error: str = "", retry_at_ms: int = 0, *,
                 keep_ms: int) -> bool:
    """Record an attempt's outcome: "delivered", "failed" (no more attempts), or "retry" at `retry_at_ms`.
    A retry's request is kept at least `keep_ms` more, past its session's TTL if need be (its hash is the
    payload); a final outcome's is kept `keep_ms` more or until its own expiry (the one the process that ended
    it set, not this process's --session-ttl), whichever is later: what the claims kept it past that for is
    over."""
    reply = await redis.eval(script("callback_settle"), 2, keys.callbacks_due(keys.bucket_of_request(rid)),
                             keys.request(rid), rid, attempt, outcome, error[:500], retry_at_ms, max(1, keep_ms))
    return int(reply) == 1


async def give_up(redis: Any, rids: Iterable[str], error: str, *, now_ms: int, keep_ms: int) -> int:
    """Callbacks that wait for a place of their host while their own origin is silent too long, failed unsent
    with `error` as a last failed attempt's are (`settle`), in one pipeline; only those still queued and due by
    `now_ms` (not claimed, settled or retried since). Returns how many were failed."""
    rids = list(rids)
    if not rids:
        return 0
    pipe = redis.pipeline(transaction=False)
    for rid in rids:
        pipe.eval(script("callback_settle"), 2, keys.callbacks_due(keys.bucket_of_request(rid)), keys.request(rid),
                  rid, 0, "given_up", error[:500], now_ms, max(1, keep_ms))
    return sum(int(reply) for reply in await pipe.execute())


def _silences(origins: Iterable[Any], seen: Iterable[Any]) -> dict[str, tuple[int, int]]:
    silent: dict[str, tuple[int, int]] = {}
    for origin, value in zip(origins, seen, strict=True):
        since, _, last = text(value or "").partition(" ")
        if since.isdigit() and last.isdigit():
            silent[text(origin)] = (int(since), int(last))
    return silent


async def silent_origins(redis: Any, *, now_ms: int, gap_ms: int) -> dict[str, tuple[int, int]]:
    """The receivers (origins, `callback_origin`) no attempt got a timely success from since their last
    success or quick failure: origin -> (since when, when its last such attempt ended), in ms. A note whose
    last attempt is more than `gap_ms` old is over (a time no attempt saw is no silence): deleted here, so the
    hash holds only silences going on (an origin no callback names any more does not stay in it for good)."""
    notes = await redis.hgetall(keys.CALLBACKS_SILENT)
    silent = _silences(notes.keys(), notes.values())
    over = [origin for origin, (_, last) in silent.items() if now_ms - last > gap_ms]
    if over:  # (one extended meanwhile by another process only starts over at its next such attempt: later)
        await redis.hdel(keys.CALLBACKS_SILENT, *over)
    return {origin: seen for origin, seen in silent.items() if origin not in over}


async def silences_of(redis: Any, origins: list[str]) -> dict[str, tuple[int, int]]:
    """The notes of `origins` as they are now (a give-up's last look: a success since the pass read them
    deleted its origin's)."""
    return _silences(origins, await redis.hmget(keys.CALLBACKS_SILENT, origins)) if origins else {}


async def note_silent(redis: Any, origin: str, *, now_ms: int, gap_ms: int) -> int:
    """An attempt to `origin` got no timely success (cut at --webhook-timeout, or failed only after a host
    turns slow): its silence goes on to `now_ms`, or starts then (none yet, or its last such attempt more than
    `gap_ms` ago: a time no attempt saw is no silence). Returns its start (ms)."""
    return int(await redis.eval(script("callback_silent"), 1, keys.CALLBACKS_SILENT, origin, now_ms, gap_ms))


async def note_answered(redis: Any, origin: str) -> None:
    """An attempt to `origin` succeeded, or failed quickly (an error status, a refused connection: such a
    receiver drains through the retry schedule): it is not silent."""
    await redis.hdel(keys.CALLBACKS_SILENT, origin)
