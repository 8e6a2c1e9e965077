"""The openai engine end to end: API -> scheduler -> worker -> OpenAIEngine -> a real sim-backend server.

Failures are real: a backend that answers 503, one that is not listening yet (connection refused),
one that is never there, one that cuts streams short. The sim-backend generates the sim engine's
text, so every run is checked token by token against what the sim engine would have produced.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sluicegate.embedded import free_port
from sluicegate.sessions.runs import RunSpec
from sluicegate.settings import Settings
from sluicegate.workers.engines.http1 import HTTP1Client
from sluicegate.workers.engines.openai import OpenAIEngine, StreamState, sse_lines
from sluicegate.workers.engines.sim import prompt_of, sim_text
from sluicegate.workers.sim_backend import Faults, create_sim_backend
from tests.helpers import ON_CLUSTER, SseEvent, Stack, call, fast_settings, sse, submit, wait_for
from tests.openai_helpers import ServerThread

MESSAGES = [{"role": "system", "content": "terse"}, {"role": "user", "content": "what does a sluice gate do?"}]


@pytest.fixture
def bare_stack(redis_url: str) -> Iterator[Stack]:
    """API + scheduler, no worker: each test adds one with its own OpenAIEngine."""
    running = Stack(fast_settings(redis_url)).start(workers=0)
    yield running
    running.stop()


def engine_for(url: str, *, continues: bool = True, **options: Any) -> OpenAIEngine:
    """An engine for the sim-backend, which continues a partial answer as vLLM does (the probe, off in
    tests, would not say so: a server not identified regenerates)."""
    options = {"retries": 4, "backoff_initial": 0.02, "backoff_max": 0.2, "timeout": 10.0, **options}
    engine = OpenAIEngine(url, **options)
    engine.resume_by(continues)
    return engine


def ask(stack: Stack, session_id: str, max_tokens: int, **body: Any) -> str:
    """Submit MESSAGES (the helpers' `submit` defaults to a prompt)."""
    code, reply = call("POST", f"{stack.base_url}/v1/sessions/{session_id}/requests",
                       {"messages": MESSAGES, "max_tokens": max_tokens, **body})
    assert code == 202, reply
    return str(reply["request_id"])


def events_of(stack: Stack, rid: str) -> list[SseEvent]:
    return list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=30))


def assert_tokens(events: list[SseEvent], expected_text: str, count: int) -> None:
    tokens = [e.data for e in events if e.event == "token"]
    assert [t["index"] for t in tokens] == list(range(count))  # every index once, in order
    assert "".join(t["text"] for t in tokens) == expected_text


def test_engine_body_maps_priority_params_and_resume() -> None:
    engine = OpenAIEngine("http://127.0.0.1:1/v1/", models={"*": "m"})
    assert engine.resume_mode == "regenerate"  # a server not identified (no probe here) is never asked to continue
    engine.resume_by(True)  # as for a server the probe found can (vLLM, SGLang, llama.cpp, TGI)
    run = RunSpec(request_id="r", attempt="1", session_id="s", group="g", tenant="t", priority=7, max_tokens=10,
                  start_index=0, input_kind="m", input_text=json.dumps(MESSAGES),
                  params={"temperature": 0.2, "stop": ["\n"], "model": "evil", "max_tokens": 999, "stream": False,
                          "messages": [], "n": 3})
    body = engine.body(run, "", "m")
    assert body == {"temperature": 0.2, "stop": ["\n"], "model": "m", "messages": MESSAGES, "stream": True,
                    "max_tokens": 10, "priority": 2, "stream_options": {"include_usage": True}}
    resumed = engine.body(RunSpec(**{**run.__dict__, "start_index": 4, "priority": 0}), "a b c d ", "m")
    assert resumed["messages"] == [*MESSAGES, {"role": "assistant", "content": "a b c d "}]
    assert resumed["continue_final_message"] is True and resumed["add_generation_prompt"] is False
    assert resumed["max_tokens"] == 6 and resumed["priority"] == 9
    assert engine.base_url == "http://127.0.0.1:1/v1"
    settings = Settings(engine="openai", backend_url="http://127.0.0.1:9/v1", backend_model="default=a,big=b",
                        backend_retries=7, backend_timeout=3.0, backend_api_key="k")
    configured = OpenAIEngine.from_settings(settings)
    assert configured.models == {"default": "a", "big": "b"} and configured.retries == 7
    assert configured.timeout == 3.0 and configured.headers["authorization"] == "Bearer k"
    with pytest.raises(ValueError, match="backend-url"):
        OpenAIEngine.from_settings(Settings(engine="openai"))


def test_completes_with_the_sim_engine_text(bare_stack: Stack) -> None:
    with ServerThread(create_sim_backend(2000.0, 0.0)) as backend:
        bare_stack.add_worker(engine=engine_for(backend.url))  # no --backend-model: asks /v1/models
        rids = [ask(bare_stack, f"s{i}", 15 + i, priority=7)
                for i in range(5)]
        for i, rid in enumerate(rids):
            events = events_of(bare_stack, rid)
            assert events[-1].event == "done" and events[-1].data["tokens"] == 15 + i
            assert_tokens(events, sim_text(prompt_of(MESSAGES), 15 + i), 15 + i)
        prompt_rid = submit(bare_stack.base_url, "p", prompt="hello", max_tokens=6)
        assert_tokens(events_of(bare_stack, prompt_rid), sim_text("hello", 6), 6)


def test_a_request_shows_where_its_first_tokens_time_went(bare_stack: Stack) -> None:
    """GET /v1/requests/{id} carries the worker's timestamps of its take of the run from its inbox, of its
    engine call and of the engine's first token (what `bench ttft` splits the dispatch-to-first-append hop
    by): in causal order up to the first token's append, with the backend's prefill between the last two.
    On one server the take follows the dispatch; on a cluster the worker starts the run after its take."""
    with ServerThread(create_sim_backend(2000.0, 80.0)) as backend:  # 80 ms before the first token
        bare_stack.add_worker(engine=engine_for(backend.url, models={"*": "sim"}))
        rid = ask(bare_stack, "s", 4)
        assert events_of(bare_stack, rid)[-1].event == "done"
    view = call("GET", f"{bare_stack.base_url}/v1/requests/{rid}")[1]
    started, called, answered = view["started_at"], view["backend_called_at"], view["backend_first_token_at"]
    taken = view["worker_took_at"]
    assert started <= called <= answered <= view["first_token_at"] <= view["finished_at"], view
    assert taken < called and (ON_CLUSTER or started <= taken), view  # the worker's own set-up between
    assert answered - called >= 0.08  # the backend's prefill lies between them


def test_503s_before_the_first_token_are_retried(bare_stack: Stack) -> None:
    with ServerThread(create_sim_backend(2000.0, 0.0, faults=Faults(fail_first=3))) as backend:
        bare_stack.add_worker(engine=engine_for(backend.url, retries=5, models={"*": "sim"}))
        rid = ask(bare_stack, "s", 8)
        events = events_of(bare_stack, rid)
        assert [e.event for e in events if e.event in ("preempted", "error")] == []  # retried inside the engine
        assert_tokens(events, sim_text(prompt_of(MESSAGES), 8), 8)
        assert call("GET", f"{bare_stack.base_url}/v1/requests/{rid}")[1]["attempts"] == 1


def test_connection_refused_until_the_backend_starts(bare_stack: Stack) -> None:
    port = free_port()
    engine = engine_for(f"http://127.0.0.1:{port}/v1", retries=40, backoff_max=0.25, models={"*": "sim"})
    bare_stack.add_worker(engine=engine)
    rid = ask(bare_stack, "s", 10)
    wait_for(lambda: call("GET", f"{bare_stack.base_url}/v1/requests/{rid}")[1]["status"] == "running",
             what="the request to start")
    time.sleep(0.3)  # the engine is retrying against a closed port
    assert call("GET", f"{bare_stack.base_url}/v1/requests/{rid}")[1]["tokens"] == 0
    with ServerThread(create_sim_backend(2000.0, 0.0), port=port):
        events = events_of(bare_stack, rid)
    assert events[-1].event == "done"
    assert_tokens(events, sim_text(prompt_of(MESSAGES), 10), 10)


def test_a_backend_that_never_answers_leaves_the_request_waiting(bare_stack: Stack,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listening (a backend still loading its model): the run is handed back without counting as a
    failed attempt (old: it failed its --max-attempts in seconds, `error`), its tenant told why without the
    backend's address; the worker withdraws its slots, and the request waits until the backend answers."""
    from sluicegate.workers import worker as worker_module

    monkeypatch.setattr(worker_module, "PROBE_RETRY_SECONDS", 0.5)
    port = free_port()
    bare_stack.add_worker(engine=engine_for(f"http://127.0.0.1:{port}/v1", retries=3, models={"*": "sim"}))
    rid = ask(bare_stack, "s", 10)
    stopped = next(e for e in sse(bare_stack.base_url, f"/v1/requests/{rid}/events", timeout=30)
                   if e.event in ("preempted", "error"))
    assert stopped.event == "preempted" and stopped.data["reason"] == "backend_unavailable", stopped
    message = stopped.data["detail"]
    assert "3 times" in message and "cannot connect" in message
    assert f"127.0.0.1:{port}" not in message  # tenants read it: the backend's address stays in the log
    time.sleep(2)  # handed back again and again meanwhile, if at all: never counted
    status = call("GET", f"{bare_stack.base_url}/v1/requests/{rid}")[1]
    assert status["status"] in ("queued", "preempted") and status["failed_attempts"] == 0, status
    with ServerThread(create_sim_backend(2000.0, 0.0), port=port):
        events = events_of(bare_stack, rid)
    assert events[-1].event == "done", events[-1]
    assert_tokens(events, sim_text(prompt_of(MESSAGES), 10), 10)
    assert call("GET", f"{bare_stack.base_url}/v1/requests/{rid}")[1]["failed_attempts"] == 0


def test_a_4xx_is_permanent_and_not_retried(bare_stack: Stack) -> None:
    faults = Faults(fail_first=1, fail_status=400)  # a retry would succeed: the request must fail anyway
    with ServerThread(create_sim_backend(2000.0, 0.0, faults=faults)) as backend:
        bare_stack.add_worker(engine=engine_for(backend.url, models={"*": "sim"}))
        rid = ask(bare_stack, "s", 5)
        events = events_of(bare_stack, rid)
        assert events[-1].event == "error" and "HTTP 400" in events[-1].data["message"]
        assert faults.requests == 1


def test_a_stream_cut_after_tokens_resumes_from_the_tokens_so_far(bare_stack: Stack) -> None:
    faults = Faults(break_streams=2, break_after=3)
    with ServerThread(create_sim_backend(2000.0, 0.0, faults=faults)) as backend:
        bare_stack.add_worker(engine=engine_for(backend.url, models={"*": "sim"}), backend_retries=4)
        rid = ask(bare_stack, "s", 12)
        events = events_of(bare_stack, rid)
    names = [e.event for e in events]
    assert names.count("preempted") == 2 and names.count("resumed") == 2 and names[-1] == "done"
    preempted = [e.data for e in events if e.event == "preempted"]
    assert [p["index"] for p in preempted] == [3, 6]
    assert all(p["reason"] == "backend_error" and "after 3 tokens" in p["detail"] for p in preempted)
    assert_tokens(events, sim_text(prompt_of(MESSAGES), 12), 12)  # the uninterrupted output, exactly once


def test_a_stream_that_keeps_breaking_ends_with_an_error(bare_stack: Stack) -> None:
    faults = Faults(break_streams=100, break_after=2)
    with ServerThread(create_sim_backend(2000.0, 0.0, faults=faults)) as backend:
        bare_stack.add_worker(engine=engine_for(backend.url, models={"*": "sim"}), max_attempts=2)
        rid = ask(bare_stack, "s", 12)
        events = events_of(bare_stack, rid)
    assert [e.event for e in events].count("preempted") == 1  # handed back once, then out of attempts
    message = events[-1].data["message"]
    assert events[-1].event == "error" and "broke after 2 tokens" in message and "--max-attempts 2" in message
    status = call("GET", f"{bare_stack.base_url}/v1/requests/{rid}")[1]
    assert status["status"] == "failed" and status["failed_attempts"] == 2
    assert_tokens(events, sim_text(prompt_of(MESSAGES), 4), 4)


def test_a_backend_without_priority_scheduling_still_serves(bare_stack: Stack) -> None:
    with ServerThread(create_sim_backend(2000.0, 0.0, faults=Faults(reject_priority=True))) as backend:
        engine = engine_for(backend.url, models={"*": "sim"})
        bare_stack.add_worker(engine=engine)
        rid = ask(bare_stack, "s", 5, priority=2)
        assert_tokens(events_of(bare_stack, rid), sim_text(prompt_of(MESSAGES), 5), 5)
        assert engine.send_priority is False


def test_a_backend_that_refuses_max_tokens_is_asked_by_max_completion_tokens(bare_stack: Stack) -> None:
    """OpenAI's reasoning models refuse `max_tokens` ("Use 'max_completion_tokens' instead"): the engine
    asks by the newer name from then on, with the same budget, a resume's remainder included."""
    faults = Faults(reject_max_tokens=True)
    with ServerThread(create_sim_backend(2000.0, 0.0, faults=faults)) as backend:
        engine = engine_for(backend.url, models={"*": "sim"})
        bare_stack.add_worker(engine=engine)
        rid = ask(bare_stack, "s", 5)
        assert_tokens(events_of(bare_stack, rid), sim_text(prompt_of(MESSAGES), 5), 5)
        assert engine.capabilities.budget_field == "max_completion_tokens"
        resumed = RunSpec(request_id=rid, attempt="2", session_id="s", group="default", tenant="t", priority=5,
                          max_tokens=7, start_index=3, input_kind="m", input_text=json.dumps(MESSAGES), params={})
        body = engine.body(resumed, "a b c ", "sim")
        assert "max_tokens" not in body and body["max_completion_tokens"] == 4
    assert faults.requests == 2  # refused once, then served: learnt for good


def test_the_probe_learns_a_servers_kind_slots_and_refusals() -> None:
    """workers/engines/probe.py against servers that say different things: the sim-backend (an unknown
    OpenAI-compatible server that streams usage), one refusing `priority` as vLLM does without priority
    scheduling, and one with llama.cpp's `/props` (its slot count)."""
    import asyncio

    import aiohttp
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    from sluicegate.workers.engines.probe import Capabilities, probe

    async def props(_: Any) -> JSONResponse:
        return JSONResponse({"total_slots": 3, "default_generation_settings": {}})

    llama_like = Starlette(routes=[Route("/props", props), Mount("/", create_sim_backend(2000.0, 0.0))])

    async def learn(url: str) -> Capabilities:
        async with aiohttp.ClientSession() as session:
            return await probe(session, url, "sim")

    with ServerThread(create_sim_backend(2000.0, 0.0)) as plain, \
            ServerThread(create_sim_backend(2000.0, 0.0, faults=Faults(reject_priority=True))) as strict, \
            ServerThread(llama_like) as llama:
        assert asyncio.run(learn(plain.url)) == Capabilities("openai-compatible", streams_usage=True, continues=False)
        assert asyncio.run(learn(strict.url)).accepts_priority is False
        assert asyncio.run(learn(plain.url)).budget_field == "max_tokens"
    with ServerThread(create_sim_backend(2000.0, 0.0, faults=Faults(reject_max_tokens=True))) as newer:
        assert asyncio.run(learn(newer.url)).budget_field == "max_completion_tokens"
    with ServerThread(create_sim_backend(2000.0, 0.0)) as plain, ServerThread(llama_like) as llama:
        assert asyncio.run(learn(llama.url)) == Capabilities("llama.cpp", slots=3, counts_tokens=True, continues=True)


def test_without_backend_model_the_backends_own_model_is_listed_and_routed(bare_stack: Stack) -> None:
    """No --backend-model: the worker registers the model its backend serves (its /v1/models), so that
    Sluicegate's /v1/models lists it and a chat call naming it is routed, as the backend itself would
    answer it (not a 404 model_not_found for the backend's own model id)."""
    with ServerThread(create_sim_backend(2000.0, 0.0, model="served-7b")) as backend:
        bare_stack.add_worker(engine=engine_for(backend.url))
        listed = wait_for(lambda: [m["id"] for m in call("GET", f"{bare_stack.base_url}/v1/models")[1]["data"]]
                          or None, what="a listed model")
        assert listed == ["served-7b"]
        code, reply = call("POST", f"{bare_stack.base_url}/v1/chat/completions",
                           {"model": "served-7b", "messages": MESSAGES, "max_tokens": 3})
        assert code == 200 and reply["model"] == "served-7b" and reply["usage"]["completion_tokens"] == 3, reply


def test_a_backend_up_after_its_worker_still_gets_its_model_listed(bare_stack: Stack,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend still loading when its worker starts (nothing on its port yet): the worker looks at its
    model list again from its heartbeats, so the model is listed once the backend answers, not only
    after a restart."""
    from sluicegate.embedded import free_port
    from sluicegate.workers import worker as worker_module

    monkeypatch.setattr(worker_module, "MODEL_RETRY_SECONDS", 0.5)
    port = free_port()
    bare_stack.add_worker(engine=engine_for(f"http://127.0.0.1:{port}/v1", retries=1))
    listed = call("GET", f"{bare_stack.base_url}/v1/models")[1]["data"]
    assert [m["id"] for m in listed] == ["default"]  # no name yet: the group's
    with ServerThread(create_sim_backend(2000.0, 0.0, model="late-7b"), port=port):
        wait_for(lambda: [m["id"] for m in call("GET", f"{bare_stack.base_url}/v1/models")[1]["data"]]
                 == ["late-7b"], timeout=15, what="the late backend's model")


def test_a_worker_takes_its_slots_from_the_engine_unless_told(bare_stack: Stack) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    async def props(_: Any) -> JSONResponse:
        return JSONResponse({"total_slots": 3})

    app = Starlette(routes=[Route("/props", props), Mount("/", create_sim_backend(2000.0, 0.0))])
    with ServerThread(app) as backend:
        probed = bare_stack.add_worker(engine=engine_for(backend.url, models={"*": "sim"}), slots=None,
                                       backend_probe=True)
        told = bare_stack.add_worker(engine=engine_for(backend.url, models={"*": "sim"}), slots=2, backend_probe=True)
        shown = {w["worker_id"]: w for w in call("GET", f"{bare_stack.base_url}/v1/admin/stats")[1]["workers"]}
    assert shown[probed]["slots"] == 3 and shown[probed]["capabilities"]["server"] == "llama.cpp"
    assert shown[told]["slots"] == 2 and shown[probed]["resume"] == "continue"


def test_serve_shares_one_engines_slots_among_its_workers() -> None:
    """Each worker would take the engine's whole slot count: serve asks once and splits it."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    from sluicegate.serve import share_engine

    def with_slots(total: int) -> Starlette:
        async def props(_: Any) -> JSONResponse:
            return JSONResponse({"total_slots": total})

        return Starlette(routes=[Route("/props", props), Mount("/", create_sim_backend(2000.0, 0.0))])

    with ServerThread(with_slots(4)) as four, ServerThread(with_slots(1)) as one:
        pool = Settings(engine="openai", backend_url=four.url, backend_model="sim", workers=2)
        assert [(w.workers, w.slots) for w in share_engine(pool)] == [(2, 2), (2, 2)]
        single = share_engine(pool.replace(backend_url=one.url, workers=3))
        assert [(w.workers, w.slots) for w in single] == [(1, 1)]  # a one-at-a-time engine gets one worker
        assert [w.slots for w in share_engine(pool.replace(slots=5))] == [5, 5]  # --slots given: as given
        # 4 slots, 3 workers: the first gets the remainder (old: 3 x 1, an engine slot never used)
        assert [w.slots for w in share_engine(pool.replace(workers=3))] == [2, 1, 1]


def test_backend_continue_no_regenerates_with_a_seed_of_the_request() -> None:
    engine = OpenAIEngine("http://127.0.0.1:1/v1", models={"*": "m"})
    engine.resume_by(False)
    run = RunSpec(request_id="r1", attempt="2", session_id="s", group="g", tenant="t", priority=5, max_tokens=10,
                  start_index=4, input_kind="m", input_text=json.dumps(MESSAGES), params={"temperature": 0.7})
    body = engine.body(run, "a b c d ", "m")
    assert body["messages"] == MESSAGES and "continue_final_message" not in body  # the whole answer again
    assert body["max_tokens"] == 10 and body["seed"] == engine.body(run, "", "m")["seed"]
    assert engine.resume_mode == "regenerate"
    assert engine.body(RunSpec(**{**run.__dict__, "params": {"seed": 3}}), "", "m")["seed"] == 3  # the caller's wins


def test_a_streams_lines_are_the_same_however_its_bytes_arrive() -> None:
    """sse_lines reads what has arrived and splits it: lines cut across reads, several in one read,
    CRLF endings and a last line without its newline all come out as a line-by-line reader gives them;
    a line past MAX_LINE is an error, not an unbounded buffer. Over a real loopback connection, the
    body written in the pieces given, each flushed and let arrive before the next."""
    body = b'data: {"a": 1}\r\n\r\n: keep-alive\n\ndata: {"b": "\xc3\xa9"}\n\ndata: [DONE]'
    expected = body.split(b"\n")

    async def main() -> None:
        pieces: list[bytes] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                         % sum(map(len, pieces)))
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        client = HTTP1Client(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", {}, connect_timeout=5)
        try:
            async def lines_of(these: list[bytes]) -> list[bytes]:
                pieces[:] = these
                response = await client.post("/", b"")
                try:
                    return [line async for line in sse_lines(response)]
                finally:
                    response.release()

            assert await lines_of([body]) == expected
            for cut in range(1, len(body), 3):  # split into two reads, a line cut anywhere
                assert await lines_of([body[:cut], body[cut:]]) == expected, cut
            assert await lines_of([body[i:i + 2] for i in range(0, len(body), 2)]) == expected
            with pytest.raises(ValueError, match="over"):
                await lines_of([b"data: " + b"x" * 2**16] * 17)
        finally:
            await client.aclose()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_backend_stream_read_to_its_done_leaves_no_generator_to_the_garbage_collector() -> None:
    """At `[DONE]` the token reader returns while the line splitter is still at its last line: it is
    closed there, not left to the garbage collector, whose finalizer costs a task and a loop wake-up
    per backend call (asyncio's hook, recorded here). The stream is the engine's, over a real loopback
    connection."""
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    body = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    finalized: list[str] = []

    async def main() -> None:
        hooks = sys.get_asyncgen_hooks()

        def finalizer(generator: Any) -> None:
            finalized.append(generator.__qualname__)
            hooks.finalizer(generator)  # type: ignore[misc]

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        sys.set_asyncgen_hooks(hooks.firstiter, finalizer)
        try:
            client = HTTP1Client(url, {}, connect_timeout=5)
            response = await client.post("/", b"")
            state = StreamState()
            assert [piece async for piece in OpenAIEngine._tokens(response, state)] == ["hi"]
            assert state.finish_reason == "stop"
            response.release()
            await client.aclose()
            gc.collect()
            await asyncio.sleep(0.01)
        finally:
            sys.set_asyncgen_hooks(*hooks)
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert finalized == []
