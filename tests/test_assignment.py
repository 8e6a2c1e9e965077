"""The run spec travels with the assignment: the worker starts a run without reading the request
back (one round trip less before the first token), and gets exactly what a read would give it.
A control notice that overtakes its assignment still stops the run before the engine starts."""

from __future__ import annotations

import asyncio

import redis

from sluicegate.sessions import keys
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.runs import Assignment, RunSpec, RunStore
from sluicegate.workers.engines.sim import SimEngine
from sluicegate.workers.worker import Worker
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, submit, wait_for
from tests.test_cancel import Probe
from tests.worker_helpers import on_loop

LONG_PROMPT = "long " * 2000  # 10,000 bytes: over the inline limit, so the worker reads it itself


def test_the_assignment_carries_what_a_read_of_the_request_gives(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)  # the API only
    run = on_loop(stack)
    worker = RunStore.connect(redis_url, worker_id="default.carry.1.aaaaaa", group="default", lease_seconds=30,
                              session_ttl=60, cluster=ON_CLUSTER)  # used on the stack's loop only
    try:
        run(worker.set_free_slots(3))
        prompt_rid = submit(stack.base_url, "carry-p", prompt="héllo ✓ \"quoted\" \\ / end", max_tokens=7,
                            priority=8)
        code, reply = call("POST", f"{stack.base_url}/v1/sessions/carry-m/requests",
                           {"messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "why\nnewline?"}],
                            "max_tokens": 5, "tenant": "acme", "params": {"temperature": 0.5, "stop": ["\n"]}})
        assert code == 202, reply
        messages_rid = reply["request_id"]
        long_rid = submit(stack.base_url, "carry-l", prompt=LONG_PROMPT, max_tokens=3)

        for rid in (prompt_rid, messages_rid, long_rid):
            assignment = run(worker.next_assignment(timeout=5))
            assert assignment.key == f"{rid}|1"
            if ON_CLUSTER:  # the worker starts the run on the data plane, whose reply carries the spec
                assert assignment.fields is None
            else:
                assert assignment.fields is not None
                assert ("in" in assignment.fields) == (rid != long_rid)
            carried = run(worker.spec(assignment))
            assert carried is not None and carried == run(worker.load(rid, "1"))
        assert carried.prompt == LONG_PROMPT
        assert run(worker.load(prompt_rid, "1")).prompt == "héllo ✓ \"quoted\" \\ / end"  # type: ignore[union-attr]
        messages = run(worker.load(messages_rid, "1"))
        assert messages.messages[1]["content"] == "why\nnewline?" and messages.tenant == "acme"
        assert messages.params == {"temperature": 0.5, "stop": ["\n"]}

        # an input that is gone (the request ended) gives no spec, rather than a run with no prompt
        r.delete(keys.request_input(long_rid))
        assert run(worker.spec(Assignment(long_rid, "1", {"sid": "carry-l", "mt": "3", "n": "0"}))) is None
        if not ON_CLUSTER:  # an assignment without a spec (written by an older version) is read back as before
            assert run(worker.spec(Assignment(prompt_rid, "1"))) == run(worker.load(prompt_rid, "1"))
        else:  # on a cluster it starts the run, once: a second start of the same attempt is refused
            assert run(worker.spec(Assignment(prompt_rid, "1"))) is None
    finally:
        run(worker.aclose())
        stack.stop()


def test_a_notice_that_overtakes_its_assignment_stops_the_run_before_the_engine(redis_url: str,
                                                                               r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, slots=1)).start(scheduler=False, workers=0)
    run = on_loop(stack)
    probe = Probe(SimEngine(tokens_per_second=1000, prefill_ms=0))

    async def make() -> Worker:
        return Worker(stack.settings, engine=probe, worker_id="default.early.1.bbbbbb", use_rq=False)

    worker = run(make())
    inbox: asyncio.Task[None] | None = None
    try:
        run(worker.store.set_free_slots(1, 1))
        rid = submit(stack.base_url, "early", max_tokens=5)
        assert r.llen(keys.worker_inbox("default", worker.worker_id)) == 1  # dispatched, not picked up yet
        assert call("DELETE", f"{stack.base_url}/v1/requests/{rid}")[0] == 200
        worker._notice(f"{rid}|1")  # the cancel's notice, arriving before the assignment is read

        async def start() -> asyncio.Task[None]:
            return asyncio.create_task(worker._inbox_loop())

        inbox = run(start())
        wait_for(lambda: r.lrange("sg:{g:default}:idle", 0, -1) == [worker.worker_id], timeout=10,
                 what="the slot to come back")
        assert rid not in probe.closed, "the engine was started for a run already cancelled"
        assert call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "cancelled"
        assert not worker.runs and not worker.early_notices
    finally:
        async def stop() -> None:
            worker.stopping = True
            await worker.store.wake_inbox()
            if inbox is not None:
                await asyncio.wait_for(inbox, 5)
            await worker.redis.aclose()

        run(stop())
        stack.stop()


def test_a_burst_of_assignments_is_read_in_one_round_trip_in_dispatch_order(redis_url: str, r: redis.Redis) -> None:
    """next_assignments takes every waiting assignment (up to its bound) at once, oldest first, and
    a wake-up ("|", which the worker skips) comes first; an empty inbox answers [] after the timeout."""
    stack = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)
    run = on_loop(stack)
    worker = RunStore.connect(redis_url, worker_id="default.burst.1.aaaaaa", group="default", lease_seconds=30,
                              session_ttl=60, cluster=ON_CLUSTER)
    try:
        run(worker.set_free_slots(8))
        rids = [submit(stack.base_url, f"burst-{i}", max_tokens=2) for i in range(4)]
        run(worker.wake_inbox())
        rids.append(submit(stack.base_url, "burst-4", max_tokens=2))
        taken = run(worker.next_assignments(timeout=5))
        assert [a.key for a in taken] == ["|"] + [f"{rid}|1" for rid in rids]  # a wake-up jumps the queue
        assert run(worker.next_assignments(timeout=0.1)) == []
        more = [submit(stack.base_url, f"burst-{i}", max_tokens=2) for i in range(5, 8)]
        assert [a.key for a in run(worker.next_assignments(timeout=5, most=2))] == [f"{rid}|1" for rid in more[:2]]
        assert [a.key for a in run(worker.next_assignments(timeout=5))] == [f"{more[2]}|1"]
        assert r.llen(keys.worker_inbox("default", worker.worker_id)) == 0
    finally:
        run(worker.aclose())
        stack.stop()


def test_params_with_any_json_string_reach_the_run() -> None:
    """Params are stored as the submit encoded them (json.dumps, non-ASCII escaped): a lone surrogate is a
    valid JSON escape there, and the run spec reads it back (orjson would refuse it)."""
    new = NewRequest(session_id="s", max_tokens=1, priority=5, tenant="t", group="g", prompt="p",
                     params={"stop": ["\ud800", "é"]})
    spec = RunSpec.from_fields("r", "1", {"pa": new.params_json, "in": "p", "ik": "p"})
    assert spec.params == {"stop": ["\ud800", "é"]}


def test_an_inbox_entry_parses_in_each_of_its_shapes() -> None:
    """One server: the run spec after a newline. A cluster: no spec, and (inbox format 2) the reason the
    control plane stopped the previous attempt. "|": the shutdown wake-up."""
    carried = Assignment.parse(b'ab12|1\n{"sid":"s","n":0}', taken_at=5.0)
    assert (carried.request_id, carried.attempt, carried.fields, carried.taken_at, carried.stopped_for) == (
        "ab12", "1", {"sid": "s", "n": 0}, 5.0, "")
    resumed = Assignment.parse("ab12|2|fair_share")
    assert (resumed.request_id, resumed.attempt, resumed.fields, resumed.stopped_for) == ("ab12", "2", None,
                                                                                          "fair_share")
    assert resumed.key == "ab12|2"
    plain = Assignment.parse("ab12|3")
    assert (plain.request_id, plain.attempt, plain.stopped_for) == ("ab12", "3", "")
    wake = Assignment.parse("|")
    assert (wake.request_id, wake.attempt) == ("", "")
