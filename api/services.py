"""What the routes share within one API process, built once in the app's lifespan."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import Request
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


async def principal(request: Request) -> Principal:
    return await services(request).keyring.principal(request)


async def admin(request: Request) -> Principal:
    """The caller, when it holds the admin key. As a route's (or router's) dependency its 401 and 403
    come before FastAPI validates the body's fields and the query: a tenant key learns nothing of the
    admin schema from a 422. (A body that is not JSON at all is a 422 for anyone: FastAPI decodes it
    before it solves dependencies; that says only that the route takes JSON.)"""
    who = await principal(request)
    require_admin(who)
    return who
