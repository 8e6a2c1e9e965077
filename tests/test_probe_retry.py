"""A worker whose backend is not up yet when it starts (vLLM and SGLang open their port once the model is
loaded): it probes the backend again from its heartbeats until it answers, and registers what the backend
can do and its slot count then (workers/worker.py `_look_for_probe`), not the defaults for good."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from sluicegate.embedded import free_port
from sluicegate.sessions import keys
from sluicegate.sessions.runs import shown_info
from sluicegate.workers import worker as worker_module
from sluicegate.workers.engines.openai import OpenAIEngine
from sluicegate.workers.sim_backend import create_sim_backend
from sluicegate.workers.worker import Worker
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, submit, wait_for
from tests.openai_helpers import ServerThread
from tests.worker_helpers import assert_tickets_balanced, idle_tickets, on_loop


@pytest.fixture
def stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url)).start(workers=0)
    yield running
    running.stop()


def backend(info_route: str, info: dict[str, Any], tokens_per_second: float = 2000.0) -> Starlette:
    """The sim-backend behind a server kind's own endpoint (what the probe identifies it by)."""
    async def answer(_: Any) -> JSONResponse:
        return JSONResponse(info)

    return Starlette(routes=[Route(info_route, answer), Mount("/", create_sim_backend(tokens_per_second, 0.0))])


def engine_at(port: int) -> OpenAIEngine:
    return OpenAIEngine(f"http://127.0.0.1:{port}/v1", models={"*": "sim"}, retries=1, backoff_initial=0.02,
                        backoff_max=0.2, timeout=5.0)


def registered(r: redis.Redis, wid: str) -> dict[str, Any]:
    """What the worker registered in Redis (its slots, capabilities, resume mode)."""
    return shown_info(r.hget(keys.group_key("default", "workers"), wid) or "")


def test_a_backend_up_after_its_worker_is_probed_once_it_answers(stack: Stack, r: redis.Redis,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An SGLang still loading: the worker offers the default 8 slots meanwhile; once it answers, the
    worker registers SGLang's capabilities (higher priorities first, continuation) and its 3 slots, with
    exactly 3 tickets. Probed once only, it kept the defaults for good: inverted priorities, 8 slots,
    resumes by regeneration."""
    monkeypatch.setattr(worker_module, "PROBE_RETRY_SECONDS", 0.5, raising=False)
    port = free_port()
    wid = stack.add_worker(engine=engine_at(port), slots=None, backend_probe=True)
    worker = stack.workers[wid]
    before = registered(r, wid)
    assert before["slots"] == 8 and before["resume"] == "regenerate", before
    sglang = backend("/get_server_info", {"model_path": "m", "max_running_requests": 3,
                                          "schedule_low_priority_values_first": False})
    with ServerThread(sglang, port=port):
        wait_for(lambda: registered(r, wid).get("capabilities", {}).get("server") == "sglang", timeout=15,
                 what="the late backend's capabilities")
        after = registered(r, wid)
        assert after["slots"] == 3 and after["resume"] == "continue", after
        assert after["capabilities"]["priority_higher_first"] is True
        assert worker.engine.capabilities.priority_higher_first and worker.engine.resume_mode == "continue"
        assert_tickets_balanced(r, expected_slots=3)
        rid = submit(stack.base_url, "s", max_tokens=3)
        wait_for(lambda: call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "done", timeout=15,
                 what="a request on the probed backend")
        assert not worker.probe_due


def test_slots_that_shrink_under_held_runs_come_back_exactly(stack: Stack, r: redis.Redis,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend came up (llama.cpp, 2 slots) and the worker took runs in its default 8 slots before its
    next probe: the runs held past the 2 slots give no ticket back when they end, so that the worker ends
    with exactly 2 tickets, not the 8 its runs held."""
    # not probed again until the runs hold its slots
    monkeypatch.setattr(worker_module, "PROBE_RETRY_SECONDS", 3600.0, raising=False)
    port = free_port()
    wid = stack.add_worker(engine=engine_at(port), slots=None, backend_probe=True)
    worker = stack.workers[wid]
    assert registered(r, wid)["slots"] == 8
    with ServerThread(backend("/props", {"total_slots": 2}, tokens_per_second=40.0), port=port):
        rids = [submit(stack.base_url, f"s{i}", max_tokens=200) for i in range(10)]  # 5 s a run: held past the probe
        wait_for(lambda: len(worker.executing) == 8, timeout=15, what="8 runs held")
        monkeypatch.setattr(worker_module, "PROBE_RETRY_SECONDS", 0.0, raising=False)
        wait_for(lambda: registered(r, wid)["slots"] == 2, timeout=15, what="the probed slot count")
        assert len(worker.runs) > 2  # the shrink came under held runs

        def all_done() -> bool:
            return all(call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "done" for rid in rids)

        wait_for(all_done, timeout=60, interval=0.2, what="the runs to finish")
        assert_tickets_balanced(r, expected_slots=2)
        assert idle_tickets(r)[wid] == 2


def test_a_shrink_counts_the_assignments_waiting_in_the_inbox(redis_url: str, r: redis.Redis) -> None:
    """The slots shrink (4 -> 2) while the worker holds 2 runs and 2 more assignments wait in its inbox,
    each holding a ticket: 4 tickets for 2 slots, so the next 2 ends give none back. The old count took
    the held runs alone (2, no surplus): the worker kept 4 tickets for an engine of 2 slots for good."""
    stack = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)  # the API: submits dispatch
    run = on_loop(stack)
    wid = "default.shrink.1.aaaaaa"
    worker = Worker(fast_settings(redis_url, slots=4), worker_id=wid, use_rq=False)
    try:
        run(worker.store.set_free_slots(4, 4))
        for i in range(4):
            submit(stack.base_url, f"shrink{i}", max_tokens=2)
        held = run(worker.store.next_assignments(timeout=5, most=2))
        assert len(held) == 2
        for assignment in held:  # runs the worker holds (their tasks are not what is counted)
            worker.runs[assignment.key] = run(asyncio_done())
        worker.slots = 2  # what the probe found
        run(worker._resync())
        assert worker.surplus == 2
        waiting = run(worker.store.next_assignments(timeout=5, most=2))
        assert len(waiting) == 2
        for assignment in held + waiting:
            if ON_CLUSTER:  # a cluster's worker starts its run on the data plane
                assert run(worker.store.spec(assignment)) is not None
            run(worker._end(assignment.request_id, assignment.attempt, outcome="done", detail="length"))
        assert idle_tickets(r)[wid] == 2
    finally:
        run(worker.store.set_free_slots(0))
        run(worker.store.aclose())
        stack.stop()


async def asyncio_done() -> asyncio.Task[None]:
    """A finished task, standing for a run the worker holds."""
    task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
    await task
    return task
