"""Schemathesis against the API's own OpenAPI schema (issue 12, "zero 5xx"): every generated call, valid
or not, gets a status the schema documents with a body that matches it (errors are
`{"error": {"type", "message"}}`), never a 5xx, never a hang; with auth on (the admin key) and off.

The schema comes from `create_app` itself (no server needed to collect the tests) and the calls go to
a real stack (uvicorn, Valkey, scheduler, a sim worker). Runs are reproducible (`derandomize`) and
bounded (a few examples per operation; SSE reads stop after a few events or 2 s)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from sluicegate.api.app import create_app
from sluicegate.embedded import EmbeddedCluster, EmbeddedServer
from sluicegate.settings import Settings
from tests.cluster_helpers import flush_cluster
from tests.helpers import Stack, fast_settings

ADMIN_KEY = "fuzz-admin-secret"
# Every check that judges one response. All apply to the event routes too: their 200 is documented as
# text/event-stream, and schemathesis reads an event stream only up to `max_stream_events` or the
# request timeout, so a session stream that never ends is cut, not waited on.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(redis_url="redis://127.0.0.1:1")).openapi())
SCHEMA.config.max_stream_events = 1  # an event stream's first event shows its shape; then stop reading
# Hypothesis: few examples, no deadline (a 2-core machine under load), the same examples on every run.
FUZZ = settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
TIMEOUT = 2.0  # seconds per call (an event stream is read for at most this long)


def flushed_url(server: EmbeddedServer | EmbeddedCluster) -> str:
    """The server's URL, emptied first (as the `redis_url` fixture does, for a module-scoped stack)."""
    if isinstance(server, EmbeddedCluster):
        flush_cluster(server)
    else:
        client = redis.Redis.from_url(server.url)
        client.flushall()
        client.close()
    return server.url


@pytest.fixture(scope="module", params=["auth", "no-auth"])
def fuzz_stack(request: pytest.FixtureRequest, valkey_server: EmbeddedServer | EmbeddedCluster) -> Iterator[Stack]:
    """One stack per auth mode. Requests finish at once (4000 tokens/s, max_tokens at most 64), so a
    non-streamed chat call the fuzzer gets accepted answers within the timeout."""
    auth = request.param == "auth"
    running = Stack(fast_settings(flushed_url(valkey_server), auth=auth, admin_key=ADMIN_KEY if auth else None,
                                  max_tokens_limit=64, sim_tokens_per_second=4000.0)).start(workers=1)
    yield running
    running.stop()


def call_kwargs(stack: Stack) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"} if stack.settings.auth else {}
    return {"base_url": stack.base_url, "headers": headers, "timeout": TIMEOUT}


@SCHEMA.parametrize()
@FUZZ
def test_every_operation_answers_as_documented(case: schemathesis.Case, fuzz_stack: Stack) -> None:
    case.call_and_validate(checks=CHECKS, **call_kwargs(fuzz_stack))


def test_stateful_links(fuzz_stack: Stack) -> None:
    """Sequences along the links schemathesis infers: a created key to its DELETE, the groups and tenants
    listed to their PUT, the models listed to GET /v1/models/{model}. (It found the quota that, once
    stored, made every later GET /v1/admin/groups a 500.) A submit is no starting step for it (its
    session id is a path parameter nothing produces), so the routes of a real request id are covered by
    tests/test_hostile_inputs.py."""
    kwargs = call_kwargs(fuzz_stack)

    class Workflow(SCHEMA.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return kwargs

        def validate_response(self, response: Any, case: schemathesis.Case, additional_checks: Any = None,
                              **_: Any) -> None:
            case.validate_response(response, checks=CHECKS, headers=kwargs["headers"])

    # Reproducible as far as schemathesis allows: it draws whether to follow a link from a true random.
    Workflow.run(settings=settings(FUZZ, max_examples=8, stateful_step_count=6))
