"""A worker whose backend is down (restarting, loading its model) withdraws its slots instead of taking work it
can only hand back: its runs go back to wait without counting as failed attempts, the group's other workers
serve them, and with no other worker they wait queued until the backend answers its worker's probe again."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from sluicegate.embedded import free_port
from sluicegate.workers import worker as worker_module
from sluicegate.workers.sim_backend import create_sim_backend
from tests.fake_backend import FakeBackend, Script, sluicegate_in_front
from tests.helpers import Stack, call, fast_settings, sse, wait_for
from tests.openai_helpers import ServerThread

MODEL = "fake-model"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def quick_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "PROBE_RETRY_SECONDS", 0.5)


def test_a_dead_backend_worker_beside_a_healthy_one_takes_no_work_from_it(redis_url: str) -> None:
    """One worker's backend is not listening (old: its runs failed in seconds, its slots looked free again
    at once, and half the requests failed 502 with their attempts used up on it)."""
    fake = FakeBackend(models=[MODEL], default=Script.text(*["x"] * 10, chunk_delay=0.05))
    with fake.serve() as server:
        settings = fast_settings(redis_url, engine="openai", backend_url=server.url, backend_model=MODEL,
                                 backend_retries=2, backend_continue="yes", slots=1)
        stack = Stack(settings).start(workers=1)
        try:
            stack.add_worker(backend_url=f"http://127.0.0.1:{free_port()}/v1", slots=4)
            client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", timeout=120, max_retries=0)

            def one(_: int) -> str:
                try:
                    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30)
                except openai.APIStatusError as error:
                    return f"{error.status_code}: {error.message}"
                return str(reply.choices[0].message.content)

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(one, range(8)))
            assert results == ["x" * 10] * 8, results
        finally:
            fake.close()
            stack.stop()


def loading_backend(state: dict[str, Any]) -> Any:
    """llama.cpp while it loads its model: 503 "Loading model" to every call, until state["loaded"]; then a
    sim backend. Counts the chat calls that are not the probe's test request (max_tokens 1)."""
    sim = create_sim_backend(2000.0, 0.0, model=MODEL)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or state["loaded"]:
            await sim(scope, receive, send)
            return
        request = Request(scope, receive)
        if request.url.path.endswith("/chat/completions") and (await request.json()).get("max_tokens") != 1:
            state["runs"] += 1
        loading = JSONResponse({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                               status_code=503)
        await loading(scope, receive, send)

    return app


@pytest.fixture
def loading() -> Iterator[tuple[ServerThread, dict[str, Any]]]:
    state: dict[str, Any] = {"loaded": False, "runs": 0}
    with ServerThread(loading_backend(state)) as server:
        yield server, state


def worker_shown(stack: Stack) -> dict[str, Any]:
    return call("GET", f"{stack.base_url}/v1/admin/stats")[1]["workers"][0]


def test_requests_wait_queued_while_the_only_backend_loads(redis_url: str, quick_probes: None,
                                                            loading: tuple[ServerThread, dict[str, Any]]) -> None:
    """llama.cpp answering 503 while it loads, the probe on: the run is handed back uncounted (old: its
    --max-attempts used up in seconds, `error`), the worker withdraws (shown `backend: down`) and calls the
    backend for no run meanwhile; the requests wait, and all complete once the probe is answered."""
    server, state = loading
    settings = fast_settings(redis_url, engine="openai", backend_url=server.url, backend_model=MODEL,
                             backend_retries=2, backend_continue="yes", backend_probe=True, slots=2)
    stack = Stack(settings).start(workers=1)
    try:
        code, reply = call("POST", f"{stack.base_url}/v1/sessions/s0/requests", {"messages": MESSAGES, "max_tokens": 5})
        assert code == 202, reply
        first = str(reply["request_id"])
        stopped = next(e for e in sse(stack.base_url, f"/v1/requests/{first}/events", timeout=30)
                       if e.event in ("preempted", "error"))
        assert stopped.event == "preempted" and stopped.data["reason"] == "backend_unavailable", stopped
        assert "Loading model" in stopped.data["detail"]
        wait_for(lambda: worker_shown(stack).get("backend") == "down", timeout=10, what="the slots withdrawn")
        runs = state["runs"]
        rids = [first]
        for i in range(1, 4):
            code, reply = call("POST", f"{stack.base_url}/v1/sessions/s{i}/requests",
                               {"messages": MESSAGES, "max_tokens": 5})
            rids.append(str(reply["request_id"]))
        time.sleep(2)  # a few probes (every 0.5 s here), all answered 503
        assert state["runs"] == runs  # withdrawn: no run called the backend meanwhile
        for rid in rids:
            shown = call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]
            assert shown["status"] in ("queued", "preempted") and shown["failed_attempts"] == 0, shown
        state["loaded"] = True
        for rid in rids:
            events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=30))
            assert events[-1].event == "done" and events[-1].data["tokens"] == 5, events[-1]
            assert call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["failed_attempts"] == 0
        assert "backend" not in worker_shown(stack)  # offered again
    finally:
        stack.stop()


def test_an_abort_mid_stream_resumes_instead_of_ending_done(redis_url: str) -> None:
    """SGLang's graceful abort after two tokens: the run resumes and the answer is whole (old: `done` with
    finish_reason abort and a truncated answer)."""
    fake = FakeBackend(models=[MODEL], default=Script.text("Hel", "lo", " there", "."))
    fake.push(Script.text("Hel", "lo", finish_reason="abort"))
    with sluicegate_in_front(fake, redis_url, backend_retries=1) as (stack, _):
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", timeout=30, max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50)
        assert reply.choices[0].finish_reason == "stop", reply
        assert reply.choices[0].message.content == "Hello there.", reply
        assert len(fake.records) == 2


def version_but_503(state: dict[str, int]) -> Any:
    """A server the probe identifies (vLLM's /version answers) whose every chat call gets 503."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        path = request.url.path
        if path.endswith("/version"):
            response = JSONResponse({"version": "0.9.0"})
        elif path.endswith("/models"):
            response = JSONResponse({"data": [{"id": "m"}]})
        elif path.endswith("/chat/completions"):
            state["probe" if (await request.json()).get("max_tokens") == 1 else "runs"] += 1
            response = JSONResponse({"error": {"code": 503, "message": "Service Unavailable"}}, status_code=503)
        else:
            response = JSONResponse({}, status_code=404)
        await response(scope, receive, send)
    return app


@pytest.mark.usefixtures("quick_probes")
@pytest.mark.parametrize("probe", [True, False])
def test_a_backend_that_answers_its_version_but_503_to_every_chat(redis_url: str, probe: bool) -> None:
    """With the probe, its 503 keeps the worker withdrawn: no run calls it again (before: the probe passed on
    the version, the slots came back every probe period and each start was handed back, for ever). Without a
    probe the slots come back each period; the hand-backs are free only up to FREE_BACKEND_DOWN_STARTS x
    --max-attempts starts, then count, and the request fails."""
    state = {"runs": 0, "probe": 0}
    with ServerThread(version_but_503(state)) as server:
        settings = fast_settings(redis_url, engine="openai", backend_url=server.url, backend_model="m",
                                 backend_retries=1, backend_probe=probe, slots=2, max_attempts=2)
        stack = Stack(settings).start(workers=1)
        try:
            rid = call("POST", f"{stack.base_url}/v1/sessions/s0/requests",
                       {"prompt": "hi", "max_tokens": 5})[1]["request_id"]
            if probe:
                time.sleep(4)  # 8 probe periods
                view = call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]
                assert view["status"] in ("queued", "preempted") and state["runs"] <= 1, (view, state)
            else:
                limit = worker_module.FREE_BACKEND_DOWN_STARTS * 2
                view = wait_for(lambda: (v := call("GET", f"{stack.base_url}/v1/requests/{rid}")[1])["status"]
                                == "failed" and v, timeout=60, what="the request to fail")
                # the free starts (a start can be handed back before its call: the worker was withdrawn), then
                # --max-attempts counted ones
                assert view["failed_attempts"] == 2 and limit < view["attempts"] <= limit + 4, view
                assert 2 < state["runs"] <= view["attempts"], state
        finally:
            stack.stop()
