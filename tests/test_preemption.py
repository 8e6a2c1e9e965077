"""Preemption: the lowest-ranked running request (lowest class, then most recently started) gives its slot to
a waiting request of a higher class, keeps its progress and resumes at the next token index; guarded by a
minimum run quantum and a cap on preemptions per request, and never more victims than waiting requests."""

from __future__ import annotations

import time

import pytest
import redis

from sluicegate.scheduler import loop as scheduler_loop
from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings, sse, submit, wait_for
from tests.sched_harness import T0, Harness, held_tickets, tickets


def started_lows(h: Harness, spec: list[tuple[str, int]], gap: int = 10) -> dict[str, str]:
    """Start one request per (session, class), `gap` ms apart, each on its own one-slot worker."""
    rids = {}
    for i, (sid, cls) in enumerate(spec):
        h.add_worker(f"w{i}", slots=1)
        rids[sid] = h.submit(sid, priority=cls, max_tokens=10)
        assert h.status(rids[sid]) == "running"
        h.append(h.run_of(rids[sid]), 2)
        h.advance(gap)
    return rids


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_victim_is_lowest_class_then_most_recent_and_resumes_in_order(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=50, max_pre=3)
    lows = started_lows(h, [("a", 3), ("b", 1), ("c", 1)])
    victim = lows["c"]  # class 1 like b, but started later
    victim_run = h.run_of(victim)
    pubsub = r.pubsub()
    pubsub.ssubscribe(*(keys.worker_control(g, w) for w, g in h.workers.items()))
    for _ in h.workers:
        assert pubsub.get_sharded_message(timeout=1)["type"] == "ssubscribe"
    h.advance(1000)

    high = h.submit("h", priority=7, max_tokens=3)
    # the victim's slot is handed over: the high request starts on its worker in the same call
    assert h.status(victim) == "preempted" and h.status(high) == "running"
    assert h.run_of(high).wid == victim_run.wid
    assert sorted(h.running()) == sorted([lows["a"], lows["b"], high])
    assert h.pending_preemptions() == 0
    assert held_tickets(h) == {f"{lows['a']}|1", f"{lows['b']}|1", f"{high}|1"} and tickets(h) == 0
    message = pubsub.get_sharded_message(timeout=1)
    assert message["channel"] == keys.worker_control("default", victim_run.wid)
    assert message["data"] == f"{victim}|1|priority"
    assert pubsub.get_sharded_message(timeout=0.05) is None
    last = h.events("c", victim)[-1]
    assert (last.event, last.data["index"], last.data["reason"]) == ("preempted", 2, "priority")

    assert h.append(victim_run, 1) == [0, "preempted"]  # fenced at the next token
    assert h.finish(victim_run)[0] == 0  # finishing a fenced run only lets go: no ticket comes back
    assert tickets(h) == 0 and h.status(victim) == "preempted"
    h.complete(high)  # the high request's end frees the slot: the victim resumes there
    resumed = h.run_of(victim)
    assert (resumed.wid, resumed.attempt, resumed.next_index) == (victim_run.wid, "2", 2)
    h.complete(victim)
    assert h.token_indices("c", victim) == list(range(10))
    names = [e.event for e in h.events("c", victim)]
    assert names == ["queued", "started", "token", "token", "preempted", "resumed"] + ["token"] * 8 + ["done"]
    assert [e.data["index"] for e in h.events("c", victim) if e.event == "resumed"] == [2]
    assert h.req(victim)["pc"] == "1" and h.status(victim) == "done"
    assert h.status(lows["a"]) == h.status(lows["b"]) == "running"
    pubsub.close()


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_equal_or_lower_class_never_preempts(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=0)
    lows = started_lows(h, [("a", 5)])
    h.advance(1000)
    same = h.submit("s", priority=5)
    lower = h.submit("l", priority=4)
    h.sweep()
    assert h.status(lows["a"]) == "running"
    assert h.status(same) == h.status(lower) == "queued" and h.pending_preemptions() == 0


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_minimum_run_quantum(r: redis.Redis) -> None:
    """A run younger than min_run ms is not preempted; the sweep reports the moment it becomes eligible
    and preempts it then."""
    h = Harness(r)
    h.policy(min_run=50)
    low = started_lows(h, [("a", 1)], gap=0)["a"]
    h.advance(10)
    high = h.submit("h", priority=9)
    assert h.status(low) == "running" and h.status(high) == "queued"
    h.advance(39)  # T0 + 49
    *_, wake, _ = h.sweep()
    assert h.status(low) == "running"
    assert wake == T0 + 50
    h.advance(1)
    h.sweep()
    assert h.status(low) == "preempted"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_min_run_waits_for_lower_class_victim_instead_of_preempting_a_higher_one(r: redis.Redis) -> None:
    """The quantum delays the lowest-ranked victim; it does not hand the preemption to a higher class."""
    h = Harness(r)
    h.policy(min_run=50)
    h.add_worker("w0")
    mid = h.submit("m", priority=5)
    h.advance(1000)
    h.add_worker("w1")
    low = h.submit("l", priority=1)
    h.advance(10)
    h.submit("h", priority=8)
    assert h.status(mid) == h.status(low) == "running"
    h.advance(40)
    h.sweep()
    assert h.status(low) == "preempted" and h.status(mid) == "running"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_min_run_within_a_class_takes_the_next_most_recent(r: redis.Redis) -> None:
    """Inside the victims' class, a run still in its quantum is passed over for an older one of that class."""
    h = Harness(r)
    h.policy(min_run=50)
    lows = started_lows(h, [("a", 2), ("b", 2)], gap=1000)
    h.advance(-990)  # b started 10 ms ago, a 1010 ms ago
    h.submit("h", priority=8)
    assert h.status(lows["a"]) == "preempted" and h.status(lows["b"]) == "running"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_preemption_cap_per_request(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=0, max_pre=2)
    low = started_lows(h, [("a", 1)])["a"]
    for k in range(2):
        high = h.submit(f"h{k}", priority=8, max_tokens=2)
        assert h.status(low) == "preempted"
        h.finish(h.run_of(low))  # release
        h.complete(high)
        assert h.status(low) == "running"
        h.append(h.run_of(low), 1)
        h.advance(100)
    assert h.req(low)["pc"] == "2"
    third = h.submit("h2", priority=9, max_tokens=2)
    h.sweep()
    assert h.status(low) == "running" and h.status(third) == "queued"
    h.complete(low)
    assert h.status(third) == "running"
    assert h.token_indices("a", low) == list(range(10))


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_capped_victim_is_skipped_for_the_next_one(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=0, max_pre=1)
    lows = started_lows(h, [("a", 3), ("b", 1)])
    h.set_preemptions(lows["b"], 1)  # b already used its one preemption
    h.submit("h", priority=8)
    assert h.status(lows["b"]) == "running" and h.status(lows["a"]) == "preempted"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_several_arrivals_preempt_exactly_as_many_victims_as_needed(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=0)
    lows = started_lows(h, [("a", 2), ("b", 2), ("c", 2), ("d", 2)])
    h1 = h.submit("h1", priority=8, max_tokens=2)
    h2 = h.submit("h2", priority=8, max_tokens=2)
    h.submit("h1", priority=8, max_tokens=2)  # behind h1 in its session: not ready, needs no slot
    for _ in range(3):
        h.sweep()
    preempted = {sid for sid, rid in lows.items() if h.status(rid) == "preempted"}
    assert preempted == {"c", "d"}  # the two most recently started
    assert h.status(h1) == h.status(h2) == "running"  # each in its victim's slot, at once
    assert {h.run_of(h1).wid, h.run_of(h2).wid} == {h.run_of(lows["c"]).wid, h.run_of(lows["d"]).wid}
    assert h.pending_preemptions() == 0
    h.finish(h.run_of(lows["d"]))  # one victim's worker lets go: no ticket comes back, no new victim
    assert tickets(h) == 0
    h.sweep()
    assert {sid for sid, rid in lows.items() if h.status(rid) == "preempted"} == {"c", "d"}
    h.submit("h3", priority=8, max_tokens=2)  # a new ready high: one more victim, the next most recent
    assert {sid for sid, rid in lows.items() if h.status(rid) == "preempted"} == {"b", "c", "d"}
    total = sum(e.event == "preempted" for sid in lows for e in h.log(sid))
    assert total == 3


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_run_on_a_gone_worker_is_passed_over_for_the_next_victim(r: redis.Redis) -> None:
    """The natural victim's worker is gone (its presence key lapsed): its slot would go nowhere, so the next
    lowest-ranked run stops and the high request starts on that one's worker."""
    h = Harness(r)
    h.policy(min_run=0)
    lows = started_lows(h, [("a", 1), ("b", 1)])  # b started later: the natural victim
    gone = h.run_of(lows["b"]).wid
    r.delete(keys.worker("default", gone))
    high = h.submit("h", priority=8, max_tokens=2)
    assert h.status(lows["b"]) == "running" and h.status(lows["a"]) == "preempted"
    assert h.status(high) == "running" and h.run_of(high).wid == h.run_of(lows["a"]).wid != gone


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_preempted_request_keeps_its_place(r: redis.Redis) -> None:
    """Back to the head of its session queue, and ahead of its tenant's sessions that became ready later."""
    h = Harness(r)
    h.policy(min_run=0)
    h.add_worker("w0")
    first = h.submit("a", priority=2)
    second = h.submit("a", priority=9)  # same session: waits for `first` whatever its class
    h.advance(5)
    other = h.submit("b", priority=2)
    h.advance(5)
    h.append(h.run_of(first), 3)
    high = h.submit("h", priority=8, tenant="u")
    assert h.status(first) == "preempted" and h.status(second) == "queued" and h.status(high) == "running"
    h.finish(h.run_of(first))
    h.complete(high)
    assert h.run_of(first).next_index == 3
    h.complete(first)
    h.complete(second)
    h.complete(other)
    assert h.dispatched_rids() == [first, high, first, second, other]


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_aged_request_does_not_stop_a_real_preemption(r: redis.Redis) -> None:
    """An aged request never preempts, but waiting behind it must not stop a class 7 from preempting."""
    h = Harness(r)
    h.policy(min_run=0, mw2=5)
    low = started_lows(h, [("a", 3)])["a"]
    peer = h.submit("x", priority=3)  # waits in class 3: preempts nothing, but starves class 2
    aged = h.submit("w", priority=2)
    h.advance(5000)
    assert h.sweep()[1] == 1 and h.req(aged)["ep"] == "10"
    assert h.status(low) == "running"  # aging alone preempts nothing
    high = h.submit("h", priority=7, max_tokens=2)
    assert h.status(low) == "preempted" and h.status(high) == "running"  # the class 7 takes the slot it freed
    assert h.status(aged) == "queued"
    h.finish(h.run_of(low))
    h.complete(high)  # then the aged one is ahead of everything for the freed slot
    assert h.status(aged) == "running"
    while h.runs:
        h.complete(h.runs[0].rid)
    assert h.dispatched_rids()[:3] == [low, high, aged]
    assert sorted(h.dispatched_rids()[3:]) == sorted([low, peer])


def test_preemption_end_to_end(redis_url: str) -> None:
    """Sim worker, one slot: a long low-priority stream is preempted by a high one; the client sees
    `preempted` and `resumed` and every index exactly once, and the high one finishes first."""
    stack = Stack(fast_settings(redis_url, slots=1)).start(workers=1)
    try:
        base = stack.base_url
        low = submit(base, "low", priority="low", max_tokens=400)
        for event in sse(base, f"/v1/requests/{low}/events"):
            if event.event == "token" and event.data["index"] >= 20:
                break
        high = submit(base, "high", priority="critical", max_tokens=5)
        events = list(sse(base, f"/v1/requests/{low}/events"))
        names = [e.event for e in events]
        assert "preempted" in names and "resumed" in names
        assert names.index("preempted") < names.index("resumed")
        assert [e.data["index"] for e in events if e.event == "token"] == list(range(400))
        assert [e.id for e in events] == sorted({e.id for e in events})
        resumed_at = next(e.data["index"] for e in events if e.event == "resumed")
        preempted_at = next(e.data["index"] for e in events if e.event == "preempted")
        assert resumed_at == preempted_at >= 20
        views = {rid: call("GET", f"{base}/v1/requests/{rid}")[1] for rid in (low, high)}
        assert views[high]["status"] == views[low]["status"] == "done"
        assert views[high]["finished_at"] < views[low]["finished_at"]
        assert views[low]["preemptions"] == 1
        wait_for(lambda: call("GET", f"{base}/v1/admin/stats")[1]["running"] == 0, what="idle")
    finally:
        stack.stop()


def test_a_new_groups_quantum_ends_on_time(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group that appears while the scheduler runs (its first worker starts) gets its scheduler loop
    at once: a high-priority request that comes inside a running request's preemption quantum preempts
    when the quantum ends. The loop used to start on the scheduler's next read of the groups (up to a
    second later), and the request waited for that instead (tests/test_llamacpp.py failed on it). The
    reads are 10 s apart here, so that only the hint can start the loop in time."""
    monkeypatch.setattr(scheduler_loop, "GROUPS_REFRESH_SECONDS", 10.0)
    stack = Stack(fast_settings(redis_url, slots=1, preempt_min_run_ms=100)).start(workers=0)
    try:
        base = stack.base_url
        time.sleep(0.1)  # the scheduler has read the groups: none yet
        stack.add_worker()  # registers the group "default"
        low = submit(base, "low", priority="low", max_tokens=400)
        assert [e.event for e in sse(base, f"/v1/requests/{low}/events", stop_after=2)] == ["queued", "started"]
        submitted = time.monotonic()
        high = submit(base, "high", priority="critical", max_tokens=5)
        started = next(e for e in sse(base, f"/v1/requests/{high}/events") if e.event == "started")
        waited = time.monotonic() - submitted
        assert started.event == "started" and waited < 0.6, f"the high-priority request started after {waited:.2f} s"
    finally:
        stack.stop()
