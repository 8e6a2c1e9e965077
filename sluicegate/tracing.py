"""OpenTelemetry traces, on with `--otel-endpoint URL` (the `otel` extra). Off, nothing of opentelemetry is
imported and a request pays one context-variable read (`TRACING.get()` in the submit).

- API: `TraceRequests`, an ASGI middleware that `create_app` adds only when tracing is on, opens a SERVER
  span per submit (`POST /v1/sessions/{session_id}/requests`) and chat call (`POST /v1/chat/completions`),
  a child of the caller's W3C `traceparent` (and `tracestate`) when it sends one.
- The trace context goes with the request, as the span's W3C headers under the reserved key `sg_trace` of
  its `params` (`carry_trace`, called by the submit). Why there: params are stored with the request and
  reach the worker in its run spec already, so no field, Lua script or key changes; the engines never send
  that key on (a client's own `params.sg_trace` is replaced when the API traces, and otherwise taken as
  the parent of the worker's span, as a `traceparent` header would be).
- Worker: the openai engine wraps each backend call in a CLIENT span (`traced_stream`; retries included,
  one span per attempt of the request), a child of the stored context, and sends that span's
  `traceparent` to the backend, so the engine's own traces (vLLM's `--otlp-traces-endpoint`) join in.

Spans are batched and exported with OTLP/HTTP (protobuf) to `URL/v1/traces`, from a thread: never on a
request's path. The standard variables apply: `OTEL_SERVICE_NAME` (default `sluicegate-api` and
`sluicegate-worker`), `OTEL_BSP_SCHEDULE_DELAY` and the other `OTEL_BSP_*` (batching),
`OTEL_EXPORTER_OTLP_HEADERS` (e.g. a collector's API key).
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sluicegate.settings import BadSetting

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from sluicegate.sessions.requests import NewRequest
    from sluicegate.sessions.runs import RunSpec
    from sluicegate.workers.engines.base import Piece

TRACE_PARAM = "sg_trace"  # the request's params key holding its trace context (engines never send it on)
W3C_HEADERS = ("traceparent", "tracestate")
CHAT_PATH = "/v1/chat/completions"
SUBMIT_PATH = re.compile(r"/v1/sessions/[^/]+/requests")
SUBMIT_ROUTE = "/v1/sessions/{session_id}/requests"


@dataclass(frozen=True)
class ActiveSpan:
    """The API span of the request being handled, and its W3C headers to store with the request."""

    span: Span
    carrier: dict[str, str]


# Set by TraceRequests around a traced route (so never set when tracing is off); read by the submit.
TRACING: ContextVar[ActiveSpan | None] = ContextVar("sluicegate_tracing", default=None)


def require_sdk() -> None:
    """Raise BadSetting (one line, exit 2) when --otel-endpoint is set without the otel extra."""
    try:
        found = all(importlib.util.find_spec(name) for name in (
            "opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"))
    except ModuleNotFoundError:
        found = False
    if not found:
        raise BadSetting("otel_endpoint", "needs the otel extra: pip install 'sluicegate[otel]'")


def traces_url(endpoint: str) -> str:
    """`URL/v1/traces`, as OTEL_EXPORTER_OTLP_ENDPOINT is read; a URL ending in /v1/traces is kept as it is."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Tracing:
    """One process's tracer provider, exporting to the collector; made by `tracing_for` only when on."""

    def __init__(self, endpoint: str, service: str) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
        # A provider of its own (not the global one): the API and workers of one process (tests) keep their
        # service names, and nothing else in the process is traced by surprise. It flushes at exit.
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
        self.tracer = self.provider.get_tracer("sluicegate")
        self.propagator = TraceContextTextMapPropagator()
        self.trace = trace

    def parent(self, carrier: dict[str, str]) -> Any:
        """The context a W3C carrier names (an invalid or missing traceparent: none, a new trace)."""
        return self.propagator.extract({k: v for k, v in carrier.items() if k in W3C_HEADERS})

    def headers_of(self, span: Span) -> dict[str, str]:
        """The W3C headers that make `span` the parent of what they are sent to."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self.trace.set_span_in_context(span))
        return carrier

    def failed(self, span: Span, error: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))

    def flush(self, timeout_ms: int = 5000) -> bool:
        return bool(self.provider.force_flush(timeout_ms))


_tracings: dict[tuple[str, str], Tracing] = {}
_lock = threading.Lock()


def tracing_for(endpoint: str, service: str) -> Tracing:
    """The process's Tracing for this collector and service (one exporter thread each, however many apps
    or engines ask)."""
    with _lock:
        if (endpoint, service) not in _tracings:
            _tracings[(endpoint, service)] = Tracing(endpoint, service)
        return _tracings[(endpoint, service)]


def flush_all(timeout_ms: int = 5000) -> None:
    """Export every ended span now (tests; a process exiting does this by itself)."""
    for tracing in list(_tracings.values()):
        tracing.flush(timeout_ms)


# ---- the API -------------------------------------------------------------------------------------
class TraceRequests:
    """Pure ASGI middleware: a SERVER span around each submit and chat call; other routes pass untouched."""

    def __init__(self, app: ASGIApp, endpoint: str) -> None:
        self.app = app
        self.tracing = tracing_for(endpoint, "sluicegate-api")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = CHAT_PATH if path == CHAT_PATH else SUBMIT_ROUTE if SUBMIT_PATH.fullmatch(path) else None
        if route is None:
            await self.app(scope, receive, send)
            return
        tracing = self.tracing
        incoming = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                    if k in (b"traceparent", b"tracestate")}
        span = tracing.tracer.start_span(
            f"POST {route}", context=tracing.parent(incoming), kind=tracing.trace.SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route, "url.path": path})
        status = 500

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                span.set_attribute("http.response.status_code", status)
            await send(message)

        token = TRACING.set(ActiveSpan(span, tracing.headers_of(span)))
        try:
            await self.app(scope, receive, noting_status)
        except Exception as error:
            tracing.failed(span, error)
            raise
        finally:
            TRACING.reset(token)
            if status >= 500:
                span.set_status(tracing.trace.Status(tracing.trace.StatusCode.ERROR, f"HTTP {status}"))
            span.end()


def carry_trace(new: NewRequest) -> NewRequest:
    """The request with the API span's context in its params (call only when TRACING is set)."""
    active = TRACING.get()
    if active is None:
        return new
    active.span.set_attributes({"sluicegate.request_id": new.request_id, "sluicegate.session_id": new.session_id,
                                "sluicegate.tenant": new.tenant, "sluicegate.group": new.group,
                                "sluicegate.priority": new.priority})
    return replace(new, params={**new.params, TRACE_PARAM: active.carrier})


# ---- the workers ---------------------------------------------------------------------------------
def stored_carrier(params: dict[str, Any]) -> dict[str, str]:
    """The W3C headers stored with a request (anything else there, e.g. a client's junk, is ignored)."""
    stored = params.get(TRACE_PARAM)
    if not isinstance(stored, dict):
        return {}
    return {k: v for k, v in stored.items() if k in W3C_HEADERS and isinstance(v, str)}


async def traced_stream(tracing: Tracing, run: RunSpec, stream: Callable[[dict[str, str]], AsyncGenerator[Piece, None]],
                        *, server: str, model: str | None) -> AsyncIterator[Piece]:
    """`stream(headers)` (an engine's backend call sending `headers`) inside a CLIENT span, a child of the
    request's stored trace context; the span ends with the call: done, failed, or closed by a preemption
    or a cancel."""
    from sluicegate.workers.engines.base import Finish  # here: the API imports this module too

    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat", "server.address": server, "sluicegate.request_id": run.request_id,
        "sluicegate.attempt": run.attempt, "sluicegate.start_index": run.start_index,
        "gen_ai.request.max_tokens": run.max_tokens - run.start_index}
    if model:
        attributes["gen_ai.request.model"] = model
    span = tracing.tracer.start_span(f"chat {model}" if model else "chat", kind=tracing.trace.SpanKind.CLIENT,
                                     context=tracing.parent(stored_carrier(run.params)), attributes=attributes)
    pieces = stream(tracing.headers_of(span))
    produced = 0
    outcome = "closed"  # preempted or cancelled: the consumer stopped reading
    try:
        async for piece in pieces:
            if isinstance(piece, Finish):
                span.set_attribute("gen_ai.response.finish_reasons", [piece.reason])
                usage = piece.usage or {}
                for name, key in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
                    if isinstance(usage.get(key), int):
                        span.set_attribute(f"gen_ai.usage.{name}", usage[key])
            else:
                produced += 1
            yield piece
        outcome = "done"
    except Exception as error:
        outcome = "failed"
        tracing.failed(span, error)
        raise
    finally:
        await pieces.aclose()  # a closed call closes its HTTP stream at once (the backend aborts it)
        span.set_attributes({"sluicegate.tokens": produced, "sluicegate.outcome": outcome})
        span.end()
