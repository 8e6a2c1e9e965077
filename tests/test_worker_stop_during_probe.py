"""A worker stopped (SIGTERM) while it probes its backend (up to PROBE_BUDGET s) leaves at once: its probe is
stopped, no slot is offered and no run taken. It offered its slots after the probe, took the queued work and
handed it back at its shutdown (`preempted` worker_shutdown, resumed on another worker)."""

from __future__ import annotations

import asyncio

import redis

from sluicegate.workers.engines.probe import Capabilities
from sluicegate.workers.engines.sim import SimEngine
from sluicegate.workers.worker import Worker
from tests.helpers import Stack, call, fast_settings, sse, submit, wait_for


class SlowProbe(SimEngine):
    """A backend whose probe takes a while (a server still loading its model answers late)."""

    def __init__(self) -> None:
        super().__init__(tokens_per_second=400.0, prefill_ms=0)
        self.probing = asyncio.Event()
        self.probed = False  # the probe ran to its end
        self.closed = False

    async def probe(self, group: str) -> Capabilities:
        self.probing.set()
        await asyncio.sleep(2.0)
        self.probed = True
        return Capabilities("vllm", slots=4)

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


def test_a_worker_stopped_while_probing_leaves_without_taking_work(redis_url: str, r: redis.Redis) -> None:
    settings = fast_settings(redis_url, slots=2)
    stack = Stack(settings).start(workers=0)
    try:
        rid = submit(stack.base_url, "waiting", prompt="hello", max_tokens=20)

        async def stopped_while_probing() -> SlowProbe:
            engine = SlowProbe()
            worker = Worker(settings.replace(backend_probe=True), engine=engine, use_rq=False)
            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            await asyncio.wait_for(engine.probing.wait(), 10)
            stop.set()  # SIGTERM
            await asyncio.wait_for(running, 30)
            return engine

        engine = stack._call(stopped_while_probing(), timeout=60)
        info = call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]
        assert info["status"] == "queued" and info["attempts"] == 0, info  # never taken by the stopped worker
        assert not engine.probed and engine.closed  # its probe stopped with it, and what it opened closed

        stack.add_worker()
        wait_for(lambda: call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "done", timeout=30,
                 what="the request to be served")
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=20))
        assert [e.event for e in events if e.event != "token"] == ["queued", "started", "done"], \
            [(e.event, e.data) for e in events if e.event != "token"]
    finally:
        stack.stop()
