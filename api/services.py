"""What the routes share within one API process, built once in the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.dependencies.models import Dependant
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sluicegate.api.auth import KeyRing, Principal, require_admin
from sluicegate.api.directory import Directory
from sluicegate.api.guardrails import Guardrails
from sluicegate.api.recent import RecentSubmits
from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions import keys
from sluicegate.sessions.connect import UNAVAILABLE, text
from sluicegate.sessions.hub import EventHub
from sluicegate.sessions.store import SessionStore
from sluicegate.settings import Settings

log = logging.getLogger(__name__)
# Each API process writes its open streams into keys.API_STREAMS this often; an entry not rewritten for
# STREAMS_ENTRY_MS is a process that died without withdrawing it (the next /metrics deletes it). The
# margin covers a slow write and the clocks of the fleet's hosts (entries carry the writer's wall clock).
STREAMS_PUBLISH_SECONDS = 1.0
STREAMS_ENTRY_MS = 5000


def process_id() -> str:
    """This API process's field in keys.API_STREAMS: unique in the fleet (host and pid) and per app (a
    test or an embedder may run several in one process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Services:
    settings: Settings
    redis: Redis
    store: SessionStore
    hub: EventHub
    tuning: Tuning
    keyring: KeyRing
    directory: Directory
    guardrails: Guardrails
    open_streams: int = 0  # this process's (healthz, stats); /metrics reports the fleet's (fleet_open_streams)
    recent: RecentSubmits = field(init=False)  # requests just submitted here (api/recent.py)
    process_id: str = field(default_factory=process_id)  # its field in keys.API_STREAMS

    def __post_init__(self) -> None:
        self.recent = RecentSubmits(self.settings.session_ttl, leave=self.hub.leave)

    @contextmanager
    def stream_open(self) -> Iterator[None]:
        """Count an SSE stream as open for as long as the block runs (healthz, stats, metrics)."""
        self.open_streams += 1
        try:
            yield
        finally:
            self.open_streams -= 1

    async def publish_streams(self) -> None:
        """Writes this process's open streams, valid for STREAMS_ENTRY_MS, where every API process's
        /metrics sums them: with several processes on one port a scrape reaches any one of them."""
        expires = int(time.time() * 1000) + STREAMS_ENTRY_MS
        await self.redis.hset(keys.API_STREAMS, self.process_id, f"{self.open_streams} {expires}")

    async def publish_streams_forever(self) -> None:
        """The app's background task: publish_streams about once a second. A store that is down only
        skips a beat (the entry lapses if it stays down; the next write after it returns restores it)."""
        while True:
            try:
                await self.publish_streams()
            except (*UNAVAILABLE, RedisError, OSError) as exc:  # down, or refusing writes (OOM, read-only)
                log.debug("open streams not published: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(STREAMS_PUBLISH_SECONDS)

    async def withdraw_streams(self) -> None:
        """At shutdown: this process's entry leaves the fleet's count at once, not when it lapses."""
        await self.redis.hdel(keys.API_STREAMS, self.process_id)

    async def fleet_open_streams(self) -> int:
        """The SSE streams open on every live API process: this one's count now, the others' last published.
        Entries that lapsed (a process killed) or do not parse are deleted. A process that skipped its
        refreshes for STREAMS_ENTRY_MS (a store outage) and rewrites its entry while a scrape prunes it
        can lose it until its next write, a second later."""
        now = int(time.time() * 1000)
        total, lapsed = self.open_streams, []
        for raw_field, raw_value in (await self.redis.hgetall(keys.API_STREAMS)).items():
            name = text(raw_field)
            if name == self.process_id:
                continue
            try:
                count, expires = (int(part) for part in text(raw_value).split())
            except ValueError:
                lapsed.append(name)
                continue
            if expires < now:
                lapsed.append(name)
            else:
                total += max(count, 0)
        if lapsed:
            await self.redis.hdel(keys.API_STREAMS, *lapsed)
        return total


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


# The request's principal once its key is checked (a scope key: every Request of the request shares it).
PRINCIPAL = "sluicegate.principal"


async def principal(request: Request) -> Principal:
    """The caller; its key is checked once per request (asked again, as by `check_keys`, it reads nothing)."""
    who: Principal | None = request.scope.get(PRINCIPAL)
    if who is None:
        who = request.scope[PRINCIPAL] = await services(request).keyring.principal(request)
    return who


async def admin(request: Request) -> Principal:
    """The caller, when it holds the admin key. As a route's (or router's) dependency its 401 and 403
    come before FastAPI validates the body's fields and the query: a tenant key learns nothing of the
    admin schema from a 422. (A body that is not JSON at all FastAPI answers before it solves the
    dependencies: the error handlers run `check_keys` first, api/errors.py.)"""
    who = await principal(request)
    require_admin(who)
    return who


# The dependencies that check the caller's key (a new one belongs here).
KEY_CHECKS: tuple[Callable[[Request], Awaitable[Principal]], ...] = (principal, admin)


def dependency_calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    """A route's dependencies in the order FastAPI solves them (a dependency's own ones first)."""
    for sub in dependant.dependencies:
        yield from dependency_calls(sub)
        if sub.call is not None:
            yield sub.call


async def check_keys(request: Request) -> None:
    """Runs the key checks among the request's route's dependencies, as FastAPI would have (their 401 or
    403 raised): FastAPI answers a body that is not JSON (422) or not even text (400) before it solves a
    route's dependencies, and a caller they refuse must learn nothing of the route's body from that. A
    check that already ran costs nothing (`principal` keeps its answer); a request matched to no route
    (404), or to one without key checks (/metrics, /healthz, /readyz), checks nothing."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    for call in dependency_calls(dependant):
        if call in KEY_CHECKS:
            await call(request)
