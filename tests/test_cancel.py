"""Cancel: DELETE /v1/requests/{id} stops a queued request from ever running, and a running one
within about a token (the worker's control channel interrupts the engine at once); the slot comes
back and the stream ends with `cancelled`. A client that merely disconnects cancels nothing."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator

import redis

from sluicegate.sessions.runs import RunSpec, RunStore
from sluicegate.workers.engines.sim import SimEngine
from sluicegate.workers.runner import token_data
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, sse, submit, wait_for
from tests.worker_helpers import Listener, assert_tickets_balanced, on_loop, token_indices


class Probe:
    """An engine wrapper that counts the tokens each request's generation yields and notes when the
    generation is stopped (its generator closed)."""

    def __init__(self, inner: SimEngine, stall_prompt: str = "") -> None:
        self.inner = inner
        self.stall_prompt = stall_prompt
        self.yielded: dict[str, int] = defaultdict(int)
        self.closed: dict[str, threading.Event] = defaultdict(threading.Event)

    def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[str]:
        self.closed[run.request_id]  # noqa: B018 - create the event before the run can end
        return self._stream(run, so_far)

    async def _stream(self, run: RunSpec, so_far: str) -> AsyncIterator[str]:
        try:
            if run.prompt == self.stall_prompt:  # one token, then a backend that hangs for minutes
                self.yielded[run.request_id] += 1
                yield "first "
                await asyncio.sleep(120)
            async for text in self.inner.stream(run, so_far):
                self.yielded[run.request_id] += 1
                yield text
        finally:
            self.closed[run.request_id].set()

    async def aclose(self) -> None:
        await self.inner.aclose()


def status(base: str, rid: str) -> dict[str, object]:
    return call("GET", f"{base}/v1/requests/{rid}")[1]


def test_cancel_a_queued_request(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, slots=1)).start(workers=0)
    try:
        base = stack.base_url
        rid = submit(base, "q", max_tokens=20)
        code, view = call("DELETE", f"{base}/v1/requests/{rid}")
        assert code == 200 and view["status"] == "cancelled", view
        assert call("DELETE", f"{base}/v1/requests/{rid}")[0] == 409
        events = list(sse(base, f"/v1/requests/{rid}/events", timeout=10))
        assert [e.event for e in events] == ["queued", "cancelled"]

        stack.add_worker()  # work arrives: the cancelled request never runs, the next one does
        nxt = submit(base, "q", max_tokens=20)
        tail = Listener(base, nxt).join(30)
        assert tail[-1].event == "done" and token_indices(tail) == list(range(20))
        assert status(base, rid)["status"] == "cancelled" and status(base, rid)["started_at"] is None
        assert_tickets_balanced(r, expected_slots=1)
    finally:
        stack.stop()


def test_cancel_a_running_request_stops_it_within_a_token(redis_url: str, r: redis.Redis) -> None:
    probe = Probe(SimEngine(tokens_per_second=20.0, prefill_ms=0))
    stack = Stack(fast_settings(redis_url, slots=1)).start(workers=0)
    try:
        base = stack.base_url
        (wid,) = [stack.add_worker(engine=probe, slots=1)]
        rid = submit(base, "run", prompt="long", max_tokens=1000)
        behind = submit(base, "run", prompt="behind", max_tokens=10)  # same session: cancelled before it runs
        waiting = submit(base, "other", prompt="waiting", max_tokens=10)  # needs the one slot
        listener = Listener(base, rid)
        listener.first(lambda e: e.event == "token" and e.data["index"] >= 4)
        assert call("DELETE", f"{base}/v1/requests/{behind}")[0] == 200

        code, view = call("DELETE", f"{base}/v1/requests/{rid}")
        at_cancel = probe.yielded[rid]
        assert code == 200 and view["status"] == "cancelled"
        assert probe.closed[rid].wait(5), "generation went on after the cancel"
        after = probe.yielded[rid] - at_cancel
        print(f"\ntokens generated after the cancel: {after} (20 tokens/s)")
        assert after <= 2

        events = listener.join(10)
        assert events[-1].event == "cancelled"
        produced = token_indices(events)
        assert produced == list(range(len(produced))) and events[-1].data["tokens"] == len(produced)
        assert status(base, rid)["tokens"] == len(produced)

        # the slot is free at once: the waiting request runs on that worker and finishes
        tail = Listener(base, waiting).join(30)
        assert tail[-1].event == "done" and token_indices(tail) == list(range(10))
        assert [e.data["worker"] for e in tail if e.event == "started"] == [wid]
        assert status(base, behind)["status"] == "cancelled" and probe.yielded[behind] == 0
        assert_tickets_balanced(r, expected_slots=1)
    finally:
        stack.stop()


def test_cancel_interrupts_a_hung_generation_at_once(redis_url: str, r: redis.Redis) -> None:
    """The engine hangs after one token and heartbeats are rare: only the control channel can stop
    the run before its next write would be fenced (minutes away)."""
    probe = Probe(SimEngine(tokens_per_second=400.0, prefill_ms=0), stall_prompt="hang")
    stack = Stack(fast_settings(redis_url, slots=1, lease_seconds=120.0, heartbeat_seconds=60.0)).start(workers=0)
    try:
        base = stack.base_url
        stack.add_worker(engine=probe, slots=1)
        rid = submit(base, "hang", prompt="hang", max_tokens=50)
        wait_for(lambda: status(base, rid)["tokens"] == 1, what="the first token")
        assert call("DELETE", f"{base}/v1/requests/{rid}")[0] == 200
        assert probe.closed[rid].wait(10), "the cancel did not reach the worker"
        nxt = submit(base, "next", max_tokens=10)
        tail = Listener(base, nxt).join(30)
        assert tail[-1].event == "done"
        assert_tickets_balanced(r, expected_slots=1)
    finally:
        stack.stop()


def test_a_client_disconnect_never_cancels(stack: Stack, r: redis.Redis) -> None:
    base = stack.base_url
    rid = submit(base, "gone", max_tokens=200)
    seen = list(sse(base, f"/v1/requests/{rid}/events", stop_after=5, timeout=10))  # then hang up
    assert len(seen) == 5
    wait_for(lambda: status(base, rid)["status"] == "done", timeout=30, what="the generation to finish")
    assert status(base, rid)["tokens"] == 200
    events = list(sse(base, f"/v1/requests/{rid}/events", timeout=10))
    assert token_indices(events) == list(range(200)) and events[-1].event == "done"
    assert_tickets_balanced(r, expected_slots=4)


def test_cancel_while_the_finish_is_in_flight_keeps_the_ticket(redis_url: str, r: redis.Redis) -> None:
    """The run produced its last token and its worker is about to call `finish` when the cancel
    lands: the late finish only releases the slot (one ticket back, never two, never none)."""
    stack = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)
    run = on_loop(stack)
    worker = RunStore.connect(redis_url, worker_id="default.late.1.cccccc", group="default", lease_seconds=30,
                              session_ttl=60, cluster=ON_CLUSTER)  # used on the stack's loop only
    try:
        run(worker.set_free_slots(1))
        rid = submit(stack.base_url, "late", max_tokens=3)
        taken = run(worker.next_assignment(timeout=5))
        assert taken.key == f"{rid}|1"
        assert run(worker.spec(taken)) is not None  # the run starts (on a cluster: on the data plane)
        assert run(worker.append(rid, "1", 0, [token_data(rid, i, "x ") for i in range(3)])).ok
        assert call("DELETE", f"{stack.base_url}/v1/requests/{rid}")[0] == 200
        assert r.llen("sg:{g:default}:idle") == 0  # the worker has not let go yet
        assert not run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True))
        assert not run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True))
        assert r.lrange("sg:{g:default}:idle", 0, -1) == ["default.late.1.cccccc"]
        assert status(stack.base_url, rid)["status"] == "cancelled"
        nxt = submit(stack.base_url, "late2", max_tokens=3)  # and the slot takes work again
        assert run(worker.next_assignment(timeout=5)).key == f"{nxt}|1"
    finally:
        run(worker.aclose())
        stack.stop()
