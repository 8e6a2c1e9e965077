"""A run's pin refused: a store refusing writes for a moment (OOM under noeviction) is ridden out, as the run's
appends do (test_store_errors), instead of ending the run (handed back `worker_redis_error` and regenerated from
index 0); the control plane refusing it (the run was preempted meanwhile) hands the run back with the reason its
notice gives. A run is pinned before its first tool-call delta, and a structured one before its first token
(workers/runner.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.runs import RunSpec
from sluicegate.workers.engines.base import Finish, Piece, Token
from sluicegate.workers.worker import Worker
from tests.helpers import Stack, call, fast_settings, sse, submit, wait_for

TOOL_CALL = {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]}


class HeldEngine:
    """Streams one run, held before its first token until the test lets it go: a tool-call delta, or (a run
    with structured output) text only."""

    resume_mode = "continue"

    def __init__(self) -> None:
        self.called = threading.Event()
        self.go = threading.Event()

    async def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[Piece]:
        held = not self.called.is_set()  # the first call only
        self.called.set()
        while held and not self.go.is_set():
            await asyncio.sleep(0.002)
        if "response_format" not in run.params:
            yield Token("", delta=TOOL_CALL)
        for i in range(5):
            yield Token(f"t{i}")
        yield Finish("stop")

    async def aclose(self) -> None:
        pass


@pytest.mark.single_server  # OOM is set on the one server (as in test_store_errors)
@pytest.mark.parametrize("params", [{}, {"response_format": {"type": "json_object"}}], ids=["tool_call", "structured"])
def test_a_pin_rides_out_a_store_that_refuses_writes(redis_url: str, r: redis.Redis, params: dict[str, Any],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    stack = Stack(fast_settings(redis_url, slots=1)).start(workers=0)
    engine = HeldEngine()
    stack.add_worker(engine=engine)
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    try:
        rid = submit(stack.base_url, "pinned", prompt="x", max_tokens=50, params=params)
        assert engine.called.wait(10)
        with caplog.at_level(logging.WARNING, logger="sluicegate.workers.redis_retry"):
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)
            try:
                engine.go.set()  # the run is pinned now, and refused: the worker retries a write of the run
                wait_for(lambda: any(rec.getMessage().startswith(f"run {rid}|1: ") for rec in caplog.records),
                         timeout=10, what="the store to refuse a write of the run")
            finally:
                r.config_set("maxmemory", 0)
                r.config_set("maxmemory-policy", policy)
        wait_for(lambda: r.hget(keys.request(rid), "st") in keys.TERMINAL_STATUSES, timeout=30, what="the run to end")
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=20))
        # the same run went on: not handed back (worker_redis_error) and regenerated
        assert [e.event for e in events if e.event != "token"] == ["queued", "started", "done"], \
            [(e.event, e.data) for e in events if e.event != "token"]
        assert [e.data["index"] for e in events if e.event == "token"] == list(range(6 if not params else 5))
        info = call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]
        assert info["status"] == "done" and info["attempts"] == 1, info
    finally:
        r.config_set("maxmemory", 0)
        r.config_set("maxmemory-policy", policy)
        stack.stop()


def test_a_pin_refused_by_the_control_plane_hands_the_run_back_with_its_notices_reason(
        redis_url: str, r: redis.Redis) -> None:
    """Preempted (priority) just before its pin, and the notice saying so not arrived yet (here: missed, as in a
    reconnect of the control connection; the heartbeats repeat it): on a cluster the run's hand-back is what
    records the preemption on the data plane, and it said `released` (no documented reason) to the tenant."""
    settings = fast_settings(redis_url, slots=1, heartbeat_seconds=1.0, lease_seconds=3.0)
    stack = Stack(settings).start(workers=0)
    engine = HeldEngine()

    async def without_notices() -> Worker:
        worker = Worker(settings, engine=engine, use_rq=False)
        worker._on_control = lambda *_: None  # type: ignore[method-assign]
        return worker

    worker = stack._call(without_notices())
    stack.workers[worker.worker_id] = worker
    stack.start_service(worker.worker_id, worker.run)
    try:
        low = submit(stack.base_url, "low", prompt="x", max_tokens=20, priority=1)
        assert engine.called.wait(10)
        submit(stack.base_url, "high", prompt="y", max_tokens=5, priority=9)
        wait_for(lambda: r.zscore(keys.group_key("default", "run"), f"{low}|1") is None, timeout=10, interval=0.002,
                 what="the control plane to preempt the run")
        engine.go.set()  # its tool call comes now: the pin is refused
        wait_for(lambda: r.hget(keys.request(low), "st") in keys.TERMINAL_STATUSES, timeout=30, what="the run to end")
        events = list(sse(stack.base_url, f"/v1/requests/{low}/events", timeout=20))
        assert [(e.event, e.data.get("reason")) for e in events if e.event in ("started", "preempted", "resumed")] \
            == [("started", None), ("preempted", "priority"), ("resumed", None)], \
            [(e.event, e.data) for e in events if e.event != "token"]
    finally:
        stack.stop()
