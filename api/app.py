"""The API application: `create_app(settings)`; a `sluicegate api` process runs `serving_app` (a uvicorn factory)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sse_starlette import EventSourceResponse

from sluicegate.api import (
    admin_routes,
    dashboard_routes,
    models_routes,
    openai_routes,
    operator_routes,
    requests_routes,
    stream_tokens,
    streaming,
)
from sluicegate.api.auth import KeyRing
from sluicegate.api.deadline import ResponseDeadline
from sluicegate.api.directory import Directory
from sluicegate.api.errors import ERROR_RESPONSES, install_error_handlers
from sluicegate.api.guardrails import Guardrails
from sluicegate.api.hot_path import ChatHotPath
from sluicegate.api.limits import BodySizeLimit
from sluicegate.api.metrics import render_metrics
from sluicegate.api.responses import JSON
from sluicegate.api.services import Services, services
from sluicegate.gc_tuning import settle_after_start_up
from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions.connect import CONNECT_TIMEOUT, READ_TIMEOUT, async_client
from sluicegate.sessions.hub import EventHub
from sluicegate.sessions.resp import LeanRedis
from sluicegate.sessions.store import SessionStore
from sluicegate.settings import Settings, from_env

log = logging.getLogger(__name__)
# Response headers a browser page may read (the rest stay hidden from cross-origin scripts).
CORS_EXPOSED = ["X-Request-Id", "X-Session-Id", "Retry-After", "x-should-retry"]  # the last: the OpenAI SDKs' retry


def exposure_warnings(settings: Settings) -> list[str]:
    """What a configuration leaves open, said once at start (a deliberate setup stays allowed)."""
    warnings = []
    if settings.auth_enabled and not settings.admin_key:
        warnings.append("auth is on but there is no --admin-key: nobody can create keys, set limits or read /metrics")
    if not settings.auth_enabled and settings.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.append(f"--no-auth on {settings.host}: anyone who reaches this port can submit as any tenant, read "
                        "every session and change quotas, weights and keys")
    return warnings


def serving_app() -> FastAPI:
    """The app of a `sluicegate api` process (uvicorn's factory): the process is the API's alone."""
    return create_app(own_process=True)


def create_app(settings: Settings | None = None, *, own_process: bool = False) -> FastAPI:
    """`own_process`: the app owns its process (not a test's or an embedder's), so the process's garbage
    collection is tuned for it once it is up (sluicegate/gc_tuning.py)."""
    settings = settings or from_env()
    if not settings.redis_url:
        raise SystemExit("the API needs --redis-url (or run `sluicegate serve`)")
    for warning in exposure_warnings(settings):
        log.warning("%s", warning)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One immediate retry on a fresh connection: after a Redis restart every pooled connection
        # is dead and redis-py gives pool-built clients no retry, so each would fail one call (503).
        # The restarted server never saw that command, so it still runs once.
        # Commands hold a connection only while they run (SSE readers share the hub's connection, their log
        # reads the pipelined `lean` one), so a small pool is enough: a burst of callers (10,000 streams
        # opening at once) waits its turn for one of `redis_max_connections` instead of opening one each,
        # which Redis would serve no faster (it runs one command at a time). A wait past `timeout` is a 503.
        cluster = settings.redis_cluster
        size = settings.redis_max_connections
        name = f"sluicegate-api:{os.getpid()}"  # its connections in CLIENT LIST (bench streams counts them)
        lean: LeanRedis | None = None
        if cluster:  # redis-py's cluster client routes each call to its slot's master. Its pool raises past
            # max_connections instead of waiting, so it keeps today's 256 per master: the bound is one server's.
            redis: Any = async_client(settings.redis_url, cluster=True, socket_timeout=20, max_connections=256,
                                      client_name=name)
        else:
            pool = BlockingConnectionPool.from_url(settings.redis_url, max_connections=size, timeout=20,
                                                   retry=Retry(NoBackoff(), 1), socket_connect_timeout=CONNECT_TIMEOUT,
                                                   socket_timeout=READ_TIMEOUT,  # a half-open connection: a 503
                                                   client_name=name)
            redis = Redis(connection_pool=pool)
            lean = LeanRedis(settings.redis_url, client_name=name)
        hub = EventHub(settings.redis_url, cluster=cluster, client_name=name)
        await hub.start()
        app.state.services = Services(
            settings=settings, redis=redis, hub=hub, tuning=Tuning(redis),
            store=SessionStore(redis, session_ttl=settings.session_ttl, lease_seconds=settings.lease_seconds,
                               lean=lean, cluster=cluster, log_max_events=settings.session_log_max_events),
            keyring=KeyRing(redis, enabled=settings.auth_enabled, admin_key=settings.admin_key),
            directory=Directory(redis), guardrails=Guardrails(redis))
        svc: Services = app.state.services
        publisher = asyncio.create_task(svc.publish_streams_forever())  # the fleet's open streams (/metrics)
        if own_process:
            settle_after_start_up()
        try:
            yield
        finally:
            publisher.cancel()
            try:
                await publisher
            except asyncio.CancelledError:
                pass
            except Exception:  # it survives a store outage; anything else is a bug, said here, not a failed shutdown
                log.exception("the open streams' publisher had stopped")
            with contextlib.suppress(Exception):  # a store that is down: the entry lapses by itself
                await asyncio.wait_for(svc.withdraw_streams(), timeout=2)
            await hub.stop()
            if lean is not None:
                await lean.aclose()
            await redis.aclose()

    # FastAPI's native OpenTelemetry hooks are checked on every request; Sluicegate exports Prometheus
    # metrics from Redis instead, so they are switched off (measured: a large share of a request's CPU).
    app = FastAPI(title="Sluicegate", version="0.1.0", lifespan=lifespan, default_response_class=JSON,
                  telemetry={"tracing": False, "metrics": False, "logs": False}, responses=ERROR_RESPONSES)
    install_error_handlers(app)
    # Routes are matched in order, each one tried in turn: the per-request paths go first.
    app.include_router(openai_routes.router)
    app.include_router(requests_routes.router)
    # The event routes answer text/event-stream (their errors stay JSON): documented as such.
    app.include_router(streaming.router, responses={200: {"content": {"text/event-stream": {}}}},
                       default_response_class=EventSourceResponse)
    app.include_router(admin_routes.router)
    app.include_router(operator_routes.router)  # audit, usage, /readyz
    app.include_router(models_routes.router)
    app.include_router(stream_tokens.router)
    app.include_router(dashboard_routes.router)

    # HEAD too (a load balancer's check), kept out of the OpenAPI document: one operation id a route
    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz")
    async def healthz(request: Request) -> JSON:
        """Liveness: this process answers, whatever Redis does (a probe restarting every API process
        during a Redis failover would drop every open stream); /readyz asks Redis."""
        return JSON({"status": "ok", "open_streams": services(request).open_streams})

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(request: Request) -> Response:
        svc = services(request)
        await svc.keyring.require_metrics_reader(request, settings.metrics_key)
        return Response(await render_metrics(svc.redis, open_streams=await svc.fleet_open_streams(),
                                             max_tenants=settings.metrics_max_tenants),
                        media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ChatHotPath)  # inside the body size limit (the last added is the outermost)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ResponseDeadline)  # a store that hangs: 503 within seconds (api/deadline.py)
    if settings.cors_origins:  # outermost: preflights and every answer (413s, the chat hot path, SSE) get it
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list(), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=CORS_EXPOSED, max_age=600)
    if settings.otel_endpoint:  # a span per submit and chat call (sluicegate/tracing.py); off: never imported
        from sluicegate.tracing import TraceRequests

        app.add_middleware(TraceRequests, endpoint=settings.otel_endpoint)
    return app
