"""Deadlines (issue 14), against the real scripts: within a class and a tenant's share the earliest
deadline goes first, requests without one in FIFO order bounded by the horizon; a request that missed
its deadline, or is forecast to, ranks its class's max wait after it; a request about to miss its deadline
rises by at most --deadline-max-boost classes, never above the highest class with
work; a tenant that marks everything urgent gains nothing over the others; a missed deadline with
"fail" ends the request at once and charges nothing, whether it was still waiting or running without its
first token (its worker stops the engine call, and a first token past the deadline is never written)."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.runs import Assignment, RunSpec
from sluicegate.sessions.transitions import Tail, run_sync
from sluicegate.workers.engines.base import EngineError
from sluicegate.workers.engines.sim import SimEngine
from sluicegate.workers.runner import Run
from tests.helpers import Stack, call, fast_settings, sse, submit, wait_for
from tests.sched_harness import Harness
from tests.test_run_tail import one_run

SINGLE = pytest.mark.single_server  # the deterministic harness pins the clock (a global key)


def busy(h: Harness) -> str:
    """One slot, taken by a long request of another tenant: what is submitted next waits."""
    h.add_worker("w1", slots=1)
    return h.submit("blocker", tenant="other", max_tokens=1000)


def order_of(h: Harness, rids: list[str], blocker: str) -> list[str]:
    """Complete the blocker, then each run in turn: the order the waiting requests were dispatched."""
    h.complete(blocker)
    order = []
    for _ in rids:
        run = h.runs[0]
        order.append(run.rid)
        h.complete(run.rid)
    return order


@SINGLE
def test_earliest_deadline_first_and_no_deadline_in_fifo_order(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(max_pre=0)
    blocker = busy(h)
    plan = [("a", None), ("b", 5000), ("c", 1000), ("d", None), ("e", 3000)]
    rids = {}
    for name, deadline in plan:
        h.advance(10)
        rids[name] = h.submit(f"s-{name}", tenant="t", deadline_ms=deadline)
    names = {rid: name for name, rid in rids.items()}
    assert [names[rid] for rid in order_of(h, list(rids.values()), blocker)] == ["c", "e", "b", "a", "d"]


@SINGLE
def test_the_horizon_bounds_how_long_deadlines_keep_a_request_without_one_waiting(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(max_pre=0, dlh=2000)  # a request without a deadline ranks as due 2 s after it is ready
    blocker = busy(h)
    plain = h.submit("s-plain", tenant="t")
    h.advance(10)
    late = h.submit("s-late", tenant="t", deadline_ms=5000)  # due after the plain one's horizon
    soon = h.submit("s-soon", tenant="t", deadline_ms=1000)  # due before it
    assert order_of(h, [plain, late, soon], blocker) == [soon, plain, late]


@SINGLE
def test_a_request_that_missed_its_deadline_waits_behind_one_that_can_still_make_it(r: redis.Redis) -> None:
    """Under overload, work that already missed must not take the turns of work that can still make it
    (EDF's domino effect): once its deadline passes, a request ranks its class's max wait after it, so
    behind on-time work due before that, and ahead of work due after it (nothing waits forever)."""
    h = Harness(r)
    h.policy(max_pre=0, dlh=10_000, mw5=30)
    blocker = busy(h)
    missed = h.submit("s-missed", tenant="t", deadline_ms=1000)
    h.advance(1100)
    h.sweep()  # its deadline passed while it waited: re-ranked at T+1000+30000
    on_time = h.submit("s-on-time", tenant="t", deadline_ms=500)
    h.advance(200)
    plain = h.submit("s-plain", tenant="t")  # no deadline: ranks as due 10 s after it came (T+11300)
    h.advance(22_000)
    later = h.submit("s-later", tenant="t")  # due T+33300: after the missed one's bound
    assert order_of(h, [missed, on_time, plain, later], blocker) == [on_time, plain, missed, later]


@SINGLE
def test_a_request_forecast_to_miss_ranks_as_missed_at_once(r: redis.Redis) -> None:
    """The work ranked ahead of a request, at the pace its tenant is served (its runs, each lasting the
    group's mean run duration), times the forecast factor, past its deadline: it ranks as missed from the
    start, so it does not crowd out requests that can still make theirs. With the factor 0 it does not."""

    def order(factor: float) -> list[str]:
        r.flushall()
        h = Harness(r)
        h.policy(max_pre=0, dlh=10_000, mw5=60, dlf=factor)
        h.add_worker("w1", slots=1)
        h.submit("warm", tenant="t")
        h.advance(1000)
        h.complete(h.runs[0].rid)  # the group's mean run duration is now 1000 ms
        blocker = h.submit("s-blocker", tenant="t", max_tokens=1000)  # t runs one request: 1 s a turn
        names = {}
        for k in range(1, 5):  # deadlines 3 s out: b_k has k - 1 ahead, 1.5 x (k - 1) s > 3 s for b4 only
            h.advance(1)
            names[h.submit(f"s-b{k}", tenant="t", deadline_ms=3000)] = f"b{k}"
        h.advance(1)
        names[h.submit("s-plain", tenant="t")] = "plain"  # no deadline: due 10 s after it came
        return [names[rid] for rid in order_of(h, list(names), blocker)]

    assert order(1.5) == ["b1", "b2", "b3", "plain", "b4"]
    assert order(0) == ["b1", "b2", "b3", "b4", "plain"]


@SINGLE
def test_marking_everything_urgent_gains_a_tenant_nothing(r: redis.Redis) -> None:
    """Two runs of the same workload on one slot, one where tenant u gives every request a 1 ms deadline
    (so its requests are missed, or forecast to be, and reordered among themselves). With each tenant's
    requests of one size, that reordering cannot move the counters: the sequence of tenants dispatched is
    the same, request for request. With sizes that vary, the token shares stay the same within noise."""

    def tenants_served(urgent: bool, sizes: dict[str, tuple[int, int]]) -> list[tuple[str, int]]:
        r.flushall()
        h = Harness(r)
        h.policy(max_pre=0)
        h.weight("u", 1.0)
        h.weight("v", 2.0)
        rng = random.Random(5)
        n = 0
        for tenant in ("u", "v") * 4:
            n += 1
            h.submit(f"{tenant}-{n}", tenant=tenant, max_tokens=rng.randint(*sizes[tenant]),
                     deadline_ms=1 if urgent and tenant == "u" else None)
        h.add_worker("w1", slots=1)
        served = []
        for _ in range(120):
            run = h.runs[0]
            tenant = h.req(run.rid)["tn"]
            served.append((tenant, int(h.req(run.rid)["mt"])))
            h.advance(5)
            n += 1
            h.submit(f"{tenant}-{n}", tenant=tenant, max_tokens=rng.randint(*sizes[tenant]),
                     deadline_ms=1 if urgent and tenant == "u" else None)
            if n % 7 == 0:
                h.sweep()  # the deadlines pass: u's requests are re-ranked as missed
            h.complete(run.rid)
        return served

    fixed = {"u": (12, 12), "v": (20, 20)}
    plain, urgent = tenants_served(False, fixed), tenants_served(True, fixed)
    assert urgent == plain

    def v_share(served: list[tuple[str, int]]) -> float:
        return sum(t for who, t in served if who == "v") / sum(t for _, t in served)

    varied = {"u": (5, 30), "v": (5, 30)}
    plain, urgent = tenants_served(False, varied), tenants_served(True, varied)
    assert abs(v_share(plain) - 2 / 3) < 0.05 and abs(v_share(urgent) - v_share(plain)) < 0.03  # weights hold


@SINGLE
def test_a_request_about_to_miss_rises_by_the_bounded_boost_only(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(max_pre=0, dlw=100, dlb=1)
    blocker = busy(h)
    high = h.submit("s-high", tenant="t", priority=7)
    mid = h.submit("s-mid", tenant="t", priority=6)
    urgent = h.submit("s-urgent", tenant="t", priority=5, deadline_ms=500)
    assert h.sweep()[1] == 0  # slack left: nothing rises
    h.advance(401)  # within the promotion window (100 ms) of its deadline
    _, promoted, _, wake, _ = h.sweep()
    assert promoted == 1 and h.req(urgent)["ep"] == "6"  # one class up: above 5, never above 7
    # in class 6 it competes by deadline inside its tenant: it goes before the older mid request
    assert order_of(h, [high, mid, urgent], blocker) == [high, urgent, mid]


@SINGLE
def test_the_boost_never_lifts_past_the_highest_class_with_work(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(max_pre=0, dlw=100, dlb=5)
    blocker = busy(h)
    six = h.submit("s-six", tenant="t", priority=6)
    urgent = h.submit("s-urgent", tenant="t", priority=2, deadline_ms=200)
    h.advance(150)
    assert h.sweep()[1] == 1 and h.req(urgent)["ep"] == "6"  # 2 + 5 = 7 capped at 6
    assert order_of(h, [six, urgent], blocker) == [urgent, six]  # in class 6, by deadline first


@SINGLE
def test_the_boost_never_lifts_past_the_tenants_max_priority(r: redis.Redis) -> None:
    """A tenant capped at max_priority 5 (the API passes the cap with the request): its request about to
    miss is not raised above 5, though class 7 has work (the cap is kept with the request and its ready
    spec: tests/test_ready_specs.py has it come back from the stored form)."""
    h = Harness(r)
    h.policy(max_pre=0, dlw=100, dlb=2)
    blocker = busy(h)
    h.submit("s-seven", tenant="t", priority=7)
    capped = h.submit("s-capped", tenant="t", priority=4, deadline_ms=500, boost_cap=5)
    at_cap = h.submit("s-at-cap", tenant="u", priority=5, deadline_ms=500, boost_cap=5)
    free = h.submit("s-free", tenant="v", priority=4, deadline_ms=500)
    h.advance(401)
    h.sweep()
    assert (h.req(capped)["ep"], h.req(at_cap)["ep"], h.req(free)["ep"]) == ("5", "5", "6")  # up to 5; 4 + 2
    assert h.req(capped)["mx"] == "5" and "mx" not in h.req(free)
    h.complete(blocker)


@SINGLE
def test_the_sweep_wakes_when_a_deadline_needs_it(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(max_pre=0, dlw=100)
    busy(h)
    h.submit("s-high", tenant="t", priority=7)
    h.submit("s-fail", tenant="t", priority=5, deadline_ms=3000, fail_on_miss=True)
    h.submit("s-run", tenant="t", priority=4, deadline_ms=1000)
    now = h.now
    assert h.sweep()[3] == now + 1000 - 100  # the earliest: s-run's slack runs out


@SINGLE
def test_a_missed_deadline_that_fails_ends_at_once_and_charges_nothing(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(max_pre=0)
    blocker = busy(h)
    doomed = h.submit("s", tenant="t", deadline_ms=500, fail_on_miss=True)
    after = h.submit("s", tenant="t", max_tokens=5)  # the same session: runs once `doomed` ended
    late_ok = h.submit("s-run", tenant="t", deadline_ms=500)  # missed too, but it runs late
    counters = r.hgetall(keys.group_key("default", "vtc"))  # t lifted to the least counter as it arrived
    h.advance(499)
    h.sweep()
    assert h.status(doomed) == "queued"
    h.advance(2)
    h.sweep()
    assert h.status(doomed) == "failed" and h.status(late_ok) == "queued"
    (error,) = [e for e in h.events("s", doomed) if e.event == "error"]
    assert error.data["message"].startswith("deadline_exceeded")
    assert h.req(doomed)["dmt"] == "0"
    assert r.hgetall(keys.group_key("default", "vtc")) == counters  # nothing charged
    assert not r.zcard(keys.group_key("default", "dld"))
    h.complete(blocker)
    first = h.runs[0].rid
    assert first in (after, late_ok)
    h.complete(first)
    h.complete(h.runs[0].rid)
    assert h.status(after) == "done" and h.status(late_ok) == "done"
    assert h.req(late_ok)["dmt"] == "0"  # missed, and ran


@SINGLE
def test_a_deadline_met_at_the_first_token(r: redis.Redis) -> None:
    h = Harness(r)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", tenant="t", deadline_ms=500)
    h.advance(100)
    h.append(h.run_of(rid), 1)
    assert h.req(rid)["dmt"] == "1"


@SINGLE
def test_a_first_token_past_a_fail_deadline_is_not_written_and_the_run_ends_failed(r: redis.Redis) -> None:
    """The run carries the time left to its `fail` deadline (its worker's timer); a first token that
    reaches the store after the deadline is refused (nothing written), and the worker's end says why."""
    h = Harness(r)
    doomed = h.submit("s", tenant="t", deadline_ms=500, fail_on_miss=True)
    late_ok = h.submit("s-run", tenant="t", deadline_ms=500)  # "run": it may be late
    met = h.submit("s-met", tenant="t", max_tokens=4, deadline_ms=500, fail_on_miss=True)
    h.advance(100)
    h.add_worker("w1", slots=3, collect=False)
    carried = {Assignment.parse(item).request_id: Assignment.parse(item).fields
               for item in r.lrange(keys.worker_inbox("default", "w1"), 0, -1)}
    assert carried[doomed]["dx"] == 400 and "dx" not in carried[late_ok]  # type: ignore[index]
    h.collect()
    h.advance(400)
    assert h.append(h.run_of(met), 1)[0] == 1  # at the deadline: met, and nothing binds the run from here on
    h.advance(1)
    assert h.append(h.run_of(met), 3)[0] == 1
    assert h.append(h.run_of(doomed), 2)[:1] == [-2]
    assert h.req(doomed)["n"] == "0" and "ft" not in h.req(doomed) and not h.token_indices("s", doomed)
    assert h.append(h.run_of(late_ok), 1)[0] == 1 and h.req(late_ok)["dmt"] == "0"  # missed, and runs on
    h.finish(h.run_of(doomed), "failed", "deadline_exceeded")
    assert h.status(doomed) == "failed" and h.req(doomed)["dmt"] == "0"
    (error,) = [e for e in h.events("s", doomed) if e.event == "error"]
    assert error.data["message"] == "deadline_exceeded: no first token within its deadline of 500 ms"
    assert [e.event for e in h.events("s", doomed)] == ["queued", "started", "error"]
    h.finish(h.run_of(met))
    assert h.status(met) == "done" and h.req(met)["dmt"] == "1" and h.token_indices("s-met", met) == [0, 1, 2, 3]
    assert h.running() == [late_ok]  # the failed run's slot is free


@SINGLE
def test_a_run_s_last_tokens_past_a_fail_deadline_end_it_failed_not_done(r: redis.Redis) -> None:
    """A run whose whole output goes with its end (the engine finished before the first append): the end
    is judged as the first append would have been."""
    h = Harness(r)
    h.add_worker("w1", slots=2)
    doomed = h.submit("s", tenant="t", max_tokens=2, deadline_ms=500, fail_on_miss=True)
    met = h.submit("s2", tenant="t", max_tokens=2, deadline_ms=500, fail_on_miss=True)
    h.advance(500)
    run = h.run_of(met)
    tail = Tail(0, [f'{{"request_id":"{met}","index":{i},"text":"t"}}' for i in range(2)])
    assert run_sync(h.t.finish(met, run.attempt, wid=run.wid, group="default", outcome="done", detail="length",
                               return_slot=True, tail=tail))
    assert h.status(met) == "done" and h.req(met)["dmt"] == "1" and h.token_indices("s2", met) == [0, 1]
    h.advance(1)
    run = h.run_of(doomed)
    tail = Tail(0, [f'{{"request_id":"{doomed}","index":{i},"text":"t"}}' for i in range(2)])
    assert run_sync(h.t.finish(doomed, run.attempt, wid=run.wid, group="default", outcome="done", detail="length",
                               return_slot=True, tail=tail))
    assert h.status(doomed) == "failed" and h.req(doomed)["dmt"] == "0" and not h.token_indices("s", doomed)
    assert h.req(doomed)["err"].startswith("deadline_exceeded")


# ---- through the API, on one server and on a cluster ------------------------------------------------
def test_deadlines_through_the_api(redis_url: str) -> None:
    """deadline_ms and on_deadline_miss on a submit, X-Deadline-Ms on chat, the group's default per
    class, and what GET /v1/requests/{id} says of them."""
    stack = Stack(fast_settings(redis_url, slots=1)).start(workers=0)
    try:
        base = stack.base_url
        code, body = call("PUT", f"{base}/v1/admin/groups/default", {"deadlines_ms": {"7": 800, "high": 900,
                                                                                       "2": None}})
        assert code == 200 and body["deadlines_ms"] == {"7": 900}, body
        for bad in ({"deadlines_ms": {"7": 0}}, {"deadlines_ms": {"x": 5}}, {"deadlines_ms": None}):
            assert call("PUT", f"{base}/v1/admin/groups/default", bad)[0] == 422
        code, fail = call("POST", f"{base}/v1/sessions/d1/requests", {"prompt": "x", "max_tokens": 3,
                                                                       "deadline_ms": 300, "on_deadline_miss": "fail"})
        assert code == 202
        code, default = call("POST", f"{base}/v1/sessions/d2/requests", {"prompt": "x", "max_tokens": 3,
                                                                          "priority": "high"})
        assert code == 202
        view = call("GET", f"{base}/v1/requests/{default['request_id']}")[1]
        assert view["deadline_at"] == pytest.approx(view["submitted_at"] + 0.9, abs=0.002)
        assert view["deadline_met"] is None and view["on_deadline_miss"] == "run"
        code, plain = call("POST", f"{base}/v1/sessions/d4/requests", {"prompt": "x", "max_tokens": 3})
        view = call("GET", f"{base}/v1/requests/{plain['request_id']}")[1]  # no deadline: both fields, null
        assert (view["deadline_at"], view["deadline_met"]) == (None, None) and "on_deadline_miss" not in view
        for bad in ({"deadline_ms": 0}, {"deadline_ms": "soon"}, {"on_deadline_miss": "panic"}):
            assert call("POST", f"{base}/v1/sessions/d3/requests", {"prompt": "x", **bad})[0] == 422

        # no worker: the failing one ends at its deadline (the scheduler's sweep), the other waits
        events = list(sse(base, f"/v1/requests/{fail['request_id']}/events", timeout=10))
        assert [e.event for e in events] == ["queued", "error"]
        assert events[-1].data["message"].startswith("deadline_exceeded")
        view = call("GET", f"{base}/v1/requests/{fail['request_id']}")[1]
        assert view["status"] == "failed" and view["deadline_met"] is False
        waiting = call("GET", f"{base}/v1/requests/{default['request_id']}")[1]
        assert waiting["status"] == "queued"
        # Late before any worker can take it, however fast the failing one ended and a worker starts (the
        # deadline is on Redis's clock, this host's).
        time.sleep(max(0.0, waiting["deadline_at"] - time.time()) + 0.05)

        stack.add_worker()
        wait_for(lambda: call("GET", f"{base}/v1/requests/{default['request_id']}")[1]["status"] == "done",
                 timeout=20, what="the late request to run")
        assert call("GET", f"{base}/v1/requests/{default['request_id']}")[1]["deadline_met"] is False
        code, reply = call("POST", f"{base}/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                           headers={"X-Deadline-Ms": "60000", "X-Session-Id": "d-chat"})
        assert code == 200, reply
        rid = reply["id"].removeprefix("chatcmpl-")
        view = call("GET", f"{base}/v1/requests/{rid}")[1]
        assert view["deadline_met"] is True, view
        assert call("POST", f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                    headers={"X-Deadline-Ms": "-5"})[0] == 422
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        assert 'sluicegate_deadlines_total{group="default",outcome="missed",priority="5"} 1.0' in metrics
        assert 'sluicegate_deadlines_total{group="default",outcome="missed",priority="7"} 1.0' in metrics
        assert 'sluicegate_deadlines_total{group="default",outcome="met",priority="5"} 1.0' in metrics
        assert 'sluicegate_deadline_slack_seconds_count{group="default",priority="7"} 1.0' in metrics
    finally:
        stack.stop()


class PacedEngine:
    """The sim engine, slow to its first token for a prompt that says so ("slow": 3 s of prefill);
    counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.fast = SimEngine(tokens_per_second=400.0, prefill_ms=0.0)
        self.slow = SimEngine(tokens_per_second=400.0, prefill_ms=3000.0)

    def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[str]:
        self.calls += 1
        return (self.slow if run.prompt == "slow" else self.fast).stream(run, so_far)

    async def aclose(self) -> None:
        return None


def test_a_fail_deadline_stops_a_run_before_its_first_token_and_spares_one_whose_first_token_landed(
        redis_url: str) -> None:
    """Started in time, but the backend's prefill outlasts the deadline: the worker stops the engine call
    at the deadline and the request fails, with nothing generated. A first token that reached the store in
    time met the deadline, even when the store's answer comes back after it: that run goes on."""
    engine = PacedEngine()
    stack = Stack(fast_settings(redis_url, slots=2)).start(workers=0)
    try:
        base = stack.base_url
        wid = stack.add_worker(engine=engine)
        store = stack.workers[wid].store
        real_append = store.append

        async def first_answer_late(rid: str, attempt: str, first_index: int, *args: Any, **kwargs: Any) -> Any:
            result = await real_append(rid, attempt, first_index, *args, **kwargs)
            if first_index == 0:
                await asyncio.sleep(1.0)  # the first token landed in time; its answer comes after the deadline
            return result

        store.append = first_answer_late  # type: ignore[method-assign]
        slow = submit(base, "dl-slow", prompt="slow", max_tokens=5, deadline_ms=500, on_deadline_miss="fail")
        landed = submit(base, "dl-landed", prompt="quick", max_tokens=5, deadline_ms=500, on_deadline_miss="fail")
        events = list(sse(base, f"/v1/requests/{slow}/events", timeout=20))
        assert [e.event for e in events] == ["queued", "started", "error"], events
        assert events[-1].data["message"].startswith("deadline_exceeded")
        view = call("GET", f"{base}/v1/requests/{slow}")[1]
        assert view["status"] == "failed" and view["deadline_met"] is False and view["tokens"] == 0, view
        assert view["finished_at"] - view["submitted_at"] < 2.0, view  # at its deadline, not after the prefill
        events = list(sse(base, f"/v1/requests/{landed}/events", timeout=20))
        assert [e.event for e in events] == ["queued", "started"] + ["token"] * 5 + ["done"], events
        view = call("GET", f"{base}/v1/requests/{landed}")[1]
        assert view["status"] == "done" and view["deadline_met"] is True, view
        time.sleep(3.5)  # past the slow run's prefill: nothing more was generated for it
        assert [e.event for e in sse(base, "/v1/sessions/dl-slow/events", until=lambda e: e.event == "error")] == [
            "queued", "started", "error"]
        assert call("GET", f"{base}/v1/requests/{slow}")[1]["tokens"] == 0
        later = [submit(base, f"dl-after-{i}", max_tokens=2) for i in range(2)]  # both slots came back
        wait_for(lambda: all(call("GET", f"{base}/v1/requests/{rid}")[1]["status"] == "done" for rid in later),
                 timeout=10, what="later requests to run")
    finally:
        stack.stop()


def test_a_run_started_after_its_fail_deadline_fails_without_calling_the_engine(redis_url: str) -> None:
    """No scheduler sweeps here: the request waits past its deadline, then a worker comes and takes it."""
    engine = PacedEngine()
    stack = Stack(fast_settings(redis_url, slots=1)).start(scheduler=False, workers=0)
    try:
        base = stack.base_url
        rid = submit(base, "dl-late", max_tokens=3, deadline_ms=1, on_deadline_miss="fail")
        time.sleep(0.1)
        stack.add_worker(engine=engine)
        events = list(sse(base, f"/v1/requests/{rid}/events", timeout=20))
        assert [e.event for e in events] == ["queued", "started", "error"], events
        assert events[-1].data["message"].startswith("deadline_exceeded")
        view = call("GET", f"{base}/v1/requests/{rid}")[1]
        assert view["status"] == "failed" and view["deadline_met"] is False and view["tokens"] == 0, view
        assert engine.calls == 0
    finally:
        stack.stop()


class FailingEngine:
    """An engine whose backend call fails at once, before any token."""

    async def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[Any]:
        raise EngineError("the backend refused the call", transient=True)
        yield  # an async generator

    async def aclose(self) -> None:
        return None


def test_a_backend_error_just_before_a_fail_deadline_stays_a_backend_error(redis_url: str, r: redis.Redis) -> None:
    """The run's backend fails, and the deadline's timer fires while the run keeps what it produced (the
    flush after an engine error): the outcome is still the backend's error (the request resumes, to fail
    at its next start), not a cancel the worker would take for a notice (a `preempted` event, `released`)."""
    with one_run(redis_url, "dl-engine-error", 5) as (_, run, worker, rid, spec):
        timed = replace(spec, deadline_left_ms=20.0)
        runner = Run(worker, FailingEngine(), timed)  # type: ignore[arg-type]
        flush = runner._flush_quietly

        async def slow_flush(writer: asyncio.Task[None]) -> None:
            await asyncio.sleep(0.08)  # the deadline passes meanwhile
            await flush(writer)

        runner._flush_quietly = slow_flush  # type: ignore[method-assign]
        outcome = run(runner.execute())
        assert (outcome.kind, outcome.transient) == ("engine_error", True), outcome
        assert "refused" in outcome.detail and r.hget(keys.request(rid), "st") == "running"
