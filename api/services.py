"""What the routes share within one API process, built once in the app's lifespan."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.dependencies.models import Dependant
from redis.asyncio import Redis

from sluicegate.api.auth import KeyRing, Principal, require_admin
from sluicegate.api.directory import Directory
from sluicegate.api.guardrails import Guardrails
from sluicegate.api.recent import RecentSubmits
from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions.hub import EventHub
from sluicegate.sessions.store import SessionStore
from sluicegate.settings import Settings


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
    open_streams: int = 0
    recent: RecentSubmits = field(init=False)  # requests just submitted here (api/recent.py)

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
