"""OpenTelemetry (`--otel-endpoint`, sluicegate/tracing.py): a client's W3C `traceparent` reaches the backend
through the API and a worker, and both export their spans with OTLP/HTTP to a real receiver (a tiny
http.server here that decodes the protobuf with opentelemetry-proto). Off, nothing of the SDK is imported.
Real Valkey, the scripted fake backend; on one server and on a cluster."""

from __future__ import annotations

import gzip
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec

import pytest

from sluicegate.cli import build_parser, settings_from
from sluicegate.settings import BadSetting
from sluicegate.tracing import TRACE_PARAM, flush_all, require_sdk, traces_url
from tests.fake_backend import FakeBackend, Script, sluicegate_in_front
from tests.helpers import ROOT, call, sse, submit, wait_for
from tests.openai_helpers import chat_stream


def _installed() -> bool:
    try:
        return all(find_spec(m) for m in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http",
                                          "opentelemetry.proto.collector.trace.v1"))
    except ModuleNotFoundError:
        return False


needs_otel = pytest.mark.skipif(not _installed(), reason="the otel extra is not installed: "
                                "pip install -e '.[otel]' (./dev installs it)")


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int  # 2 = SERVER, 3 = CLIENT (opentelemetry.proto.trace.v1.Span.SpanKind)
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    attributes: dict[str, object]


class OtlpReceiver:
    """POST /v1/traces (OTLP/HTTP protobuf, gzipped or not) on 127.0.0.1; keeps every span it is sent."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[ReceivedSpan] = []
        self.paths: list[str] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                export = ExportTraceServiceRequest.FromString(body)
                with lock:
                    receiver.paths.append(self.path)
                    for resource_spans in export.resource_spans:
                        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                receiver.spans.append(ReceivedSpan(
                                    resource.get("service.name", ""), span.name, span.kind, span.trace_id.hex(),
                                    span.span_id.hex(), span.parent_span_id.hex(),
                                    {a.key: _value(a.value) for a in span.attributes}))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in list(self.spans) if s.trace_id == trace_id]

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: object) -> object:
    """An OTLP AnyValue as Python (arrays as lists)."""
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


def parse_traceparent(header: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent `00-<32 hex>-<16 hex>-<2 hex>`."""
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16 and len(flags) == 2, header
    return trace_id, span_id


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    if not _installed():
        pytest.skip("the otel extra is not installed: pip install -e '.[otel]' (./dev installs it)")
    with OtlpReceiver() as running:
        yield running


def spans_of(receiver: OtlpReceiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    def arrived() -> list[ReceivedSpan] | None:
        flush_all()  # export what has ended now, rather than on the batch timer
        spans = receiver.of_trace(trace_id)
        return spans if len(spans) >= count else None

    return wait_for(arrived, timeout=15, interval=0.1, what=f"{count} spans of trace {trace_id}")


@needs_otel
def test_a_clients_traceparent_reaches_the_backend_and_both_hops_export_their_spans(
        redis_url: str, receiver: OtlpReceiver) -> None:
    fake = FakeBackend(models=["m"], default=Script.text("Hel", "lo", " there"))
    with sluicegate_in_front(fake, redis_url, otel_endpoint=receiver.endpoint) as (stack, _server):
        base = stack.base_url
        # A submit that carries the client's traceparent.
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        code, reply = call("POST", f"{base}/v1/sessions/traced-1/requests",
                           {"prompt": "hi", "max_tokens": 8, "params": {"temperature": 0.5}},
                           {"traceparent": f"00-{trace_id}-{client_span}-01", "tracestate": "vendor=1"})
        assert code == 202
        events = list(sse(base, f"/v1/requests/{reply['request_id']}/events"))
        assert events[-1].event == "done"
        record = fake.wait_for_requests(1)[0]
        sent_trace, sent_parent = parse_traceparent(record.headers["traceparent"])
        assert sent_trace == trace_id and sent_parent != client_span
        assert record.headers.get("tracestate") == "vendor=1"  # carried along with it
        assert TRACE_PARAM not in record.body and record.body["temperature"] == 0.5  # the params, less ours

        spans = spans_of(receiver, trace_id, 2)
        api = next(s for s in spans if s.service == "sluicegate-api")
        worker = next(s for s in spans if s.service == "sluicegate-worker")
        assert (api.kind, api.name, api.parent_id) == (2, "POST /v1/sessions/{session_id}/requests", client_span)
        assert api.attributes["http.response.status_code"] == 202
        assert api.attributes["sluicegate.request_id"] == reply["request_id"]
        assert (worker.kind, worker.name, worker.parent_id) == (3, "chat m", api.span_id)
        assert worker.span_id == sent_parent  # the backend's parent is the worker's span
        assert worker.attributes["sluicegate.request_id"] == reply["request_id"]
        assert worker.attributes["sluicegate.tokens"] == 3 and worker.attributes["sluicegate.outcome"] == "done"
        assert worker.attributes["gen_ai.response.finish_reasons"] == ["stop"]
        assert set(receiver.paths) == {"/v1/traces"}

        # The OpenAI-compatible route, streamed: the same chain.
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        answer = chat_stream(base, {"model": "m", "messages": [{"role": "user", "content": "yo"}], "max_tokens": 8},
                             headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
        assert answer.done and answer.text == "Hello there"
        record = fake.wait_for_requests(2)[1]
        assert parse_traceparent(record.headers["traceparent"])[0] == trace_id
        spans = spans_of(receiver, trace_id, 2)
        api = next(s for s in spans if s.service == "sluicegate-api")
        worker = next(s for s in spans if s.service == "sluicegate-worker")
        assert (api.name, api.parent_id, worker.parent_id) == ("POST /v1/chat/completions", client_span, api.span_id)
        assert parse_traceparent(record.headers["traceparent"])[1] == worker.span_id

        # No traceparent: the API starts the trace, and the backend is still told it.
        rid = submit(base, "traced-2", max_tokens=4)
        list(sse(base, f"/v1/requests/{rid}/events"))
        started, _ = parse_traceparent(fake.wait_for_requests(3)[2].headers["traceparent"])
        api = next(s for s in spans_of(receiver, started, 2) if s.service == "sluicegate-api")
        assert api.parent_id == "" and api.attributes["sluicegate.request_id"] == rid


@pytest.mark.own_servers
def test_tracing_off_imports_no_sdk_and_sends_no_traceparent() -> None:
    """Nothing of the SDK or the exporter in the API's or a worker's process (FastAPI itself imports the
    opentelemetry API package, whatever Sluicegate does), and the engine has no tracer."""
    code = """
import sys
from sluicegate.settings import Settings
from sluicegate.workers.engines import make_engine
engine = make_engine(Settings(engine="openai", backend_url="http://127.0.0.1:9/v1"))
assert engine.tracing is None
worker_side = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
from sluicegate.api.app import create_app
app = create_app(Settings(redis_url="redis://127.0.0.1:9/0"))
assert "TraceRequests" not in [m.cls.__name__ for m in app.user_middleware]
loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter")))
print(worker_side, loaded)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "OTEL_"))}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []"


def test_the_flag_is_on_the_api_worker_and_serve_and_checked() -> None:
    for command in ("api", "worker", "serve"):
        args = build_parser().parse_args([command, "--otel-endpoint", "http://127.0.0.1:4318"])
        assert settings_from(args).otel_endpoint == "http://127.0.0.1:4318"
    with pytest.raises(BadSetting, match="otel_endpoint"):
        settings_from(build_parser().parse_args(["api", "--otel-endpoint", "127.0.0.1:4318"]))
    assert traces_url("http://127.0.0.1:4318/") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://127.0.0.1:4318/v1/traces") == "http://127.0.0.1:4318/v1/traces"
    if _installed():
        require_sdk()
    else:
        with pytest.raises(BadSetting, match="otel extra"):
            require_sdk()


def test_a_bad_stored_trace_context_is_ignored() -> None:
    from sluicegate.tracing import stored_carrier

    assert stored_carrier({TRACE_PARAM: "junk"}) == {}
    assert stored_carrier({TRACE_PARAM: {"traceparent": 5, "x": "y", "tracestate": "a=1"}}) == {"tracestate": "a=1"}
    assert stored_carrier({}) == {}
