"""Which run stops when a waiting request finds no slot: priority first (the lowest-ranked run, lowest class
then most recently started), fair share inside the class only when no lower-class run stops for it; every
preemptible run is a candidate, however many immune ones rank below it; and a max_concurrency cap is met
the same way (a same-class swap for fair share; a priority stop only when it lets the waiting one start)."""

from __future__ import annotations

import pytest
import redis

from sluicegate.sessions.transitions import run_sync
from tests.sched_harness import Harness, tickets


def preempted_reasons(h: Harness, sid: str, rid: str) -> list[str]:
    return [e.data["reason"] for e in h.events(sid, rid) if e.event == "preempted"]


def saturated(h: Harness) -> tuple[list[str], str]:
    """One 4-slot worker: tenant A runs three class-7 requests, tenant C one class-2 request; 1 s later."""
    h.policy(min_run=50)
    h.add_worker("w", slots=4)
    mine = [h.submit(f"a{i}", tenant="A", priority=7) for i in range(3)]
    low = h.submit("c", tenant="C", priority=2)
    h.advance(1000)
    return mine, low


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_lower_class_run_stops_before_fair_share_takes_a_same_class_one(r: redis.Redis) -> None:
    h = Harness(r)
    a_runs, low = saturated(h)
    b = h.submit("b", tenant="B", priority=7)  # B is below A's share, but C's class-2 run ranks lowest
    assert preempted_reasons(h, "c", low) == ["priority"]
    assert all(h.status(x) == "running" and not preempted_reasons(h, f"a{i}", x) for i, x in enumerate(a_runs))
    assert h.status(b) == "running" and h.pending_preemptions() == 0  # in C's slot, handed over at once
    h.sweep()  # a sweep (fair share asked again) takes nothing more
    assert all(h.status(x) == "running" for x in a_runs)
    h.handback(h.run_of(low), reason="priority")  # C's worker lets go: no ticket comes back
    assert h.status(b) == "running" and all(h.status(x) == "running" for x in a_runs) and tickets(h) == 0


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_fair_share_still_takes_a_same_class_run_when_the_lower_class_one_is_pinned(r: redis.Redis) -> None:
    h = Harness(r)
    a_runs, low = saturated(h)
    assert run_sync(h.t.pin("default", low, h.run_of(low).attempt))  # C's run is immune
    b = h.submit("b", tenant="B", priority=7)
    assert h.status(b) == "running" and h.status(low) == "running"
    assert [preempted_reasons(h, f"a{i}", x) for i, x in enumerate(a_runs)].count(["fair_share"]) == 1


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_priority_looks_past_a_full_window_of_immune_runs(r: redis.Redis) -> None:
    """32 class-0 runs (the newest preemptible, 31 pinned) rank below a preemptible class-1 run; two class-9
    requests wait. One decision stops the class-0 run and, a window further on, the class-1 run."""
    h = Harness(r)
    h.policy(min_run=0, max_pre=1)
    h.add_worker("w", slots=33)
    lows = []
    for i in range(32):
        lows.append(h.submit(f"p{i}", tenant="A", priority=0))
        h.advance(1)
    one = h.submit("one", tenant="A", priority=1)
    for x in lows[:-1]:
        assert run_sync(h.t.pin("default", x, h.run_of(x).attempt))
    for x in (lows[-1], one):
        h.set_preemptions(x, 1)  # immune (--max-preemptions 1) while the class-9 requests arrive
    highs = [h.submit(f"h{i}", tenant="B", priority=9) for i in range(2)]
    assert h.pending_preemptions() == 0 and all(h.status(x) == "queued" for x in highs)
    for x in (lows[-1], one):
        h.set_preemptions(x, 0)
    h.sweep()
    assert h.status(lows[-1]) == "preempted" and h.status(one) == "preempted"
    assert all(h.status(x) == "running" for x in lows[:-1]) and h.pending_preemptions() == 0
    assert all(h.status(x) == "running" for x in highs) and tickets(h) == 0


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_fair_share_looks_past_a_page_of_pinned_runs(r: redis.Redis) -> None:
    """The flooder's 17 newest runs are pinned: its oldest, preemptible, is the one handed over."""
    h = Harness(r)
    h.policy(min_run=0)
    h.add_worker("w", slots=18)
    floods = []
    for i in range(18):
        floods.append(h.submit(f"f{i}", tenant="flood"))
        h.advance(1)
    for x in floods[1:]:
        assert run_sync(h.t.pin("default", x, h.run_of(x).attempt))
    calm = h.submit("c", tenant="calm")
    assert h.status(calm) == "running" and preempted_reasons(h, "f0", floods[0]) == ["fair_share"]
    assert all(h.status(x) == "running" for x in floods[1:])


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_fair_share_swaps_a_run_when_max_concurrency_is_the_limit(r: redis.Redis) -> None:
    """10 slots, max_concurrency 4, a flooder holds all 4: the calm tenant takes one of its runs at once, and
    the runs in flight stay 4."""
    h = Harness(r)
    h.policy(min_run=0)
    h.quota("default", max_concurrency=4)
    h.add_worker("w", slots=10)
    floods = []
    for i in range(6):
        floods.append(h.submit(f"f{i}", tenant="flood"))
        h.advance(1)
    h.advance(100)
    calm = h.submit("c", tenant="calm")
    assert h.status(calm) == "running"
    assert [x for i, x in enumerate(floods) if preempted_reasons(h, f"f{i}", x) == ["fair_share"]] == [floods[3]]
    assert len(h.running()) == 4 and h.pending_preemptions() == 0


def class_2_runs(r: redis.Redis, count: int, *, slots: int, **policy: int) -> tuple[Harness, list[str]]:
    """`count` class-2 runs of tenant A on one worker of `slots`, started 1 ms apart (the last the most recently
    started) and run 100 ms; no min-run quantum (`policy` adds to it)."""
    h = Harness(r)
    h.policy(min_run=0, **policy)
    h.add_worker("w", slots=slots)
    lows = []
    for i in range(count):
        lows.append(h.submit(f"l{i}", tenant="A", priority=2, max_tokens=50))
        h.advance(1)
    h.advance(100)
    return h, lows


def obey_stops(h: Harness, rounds: int = 4) -> None:
    """A worker that obeys every stop notice lets go; the sweep decides again."""
    for _ in range(rounds):
        for run in [run for run in h.runs if h.status(run.rid) == "preempted"]:
            h.handback(run, reason="priority")
        h.sweep()


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_max_concurrency_of_0_stops_none_for_a_higher_class(r: redis.Redis) -> None:
    """No stop would let the class-7 request start: none is stopped (each stop's release stopped the next
    one, until every lower-class run was down)."""
    h = Harness(r)
    h.policy(min_run=0)
    h.add_worker("w", slots=4)
    lows = [h.submit(f"l{i}", tenant="A", priority=2, max_tokens=50) for i in range(3)]
    h.advance(100)
    h.quota("default", max_concurrency=0)
    high = h.submit("h", tenant="B", priority=7)
    obey_stops(h)
    assert all(h.status(x) == "running" and not preempted_reasons(h, f"l{i}", x) for i, x in enumerate(lows))
    assert h.status(high) == "queued" and h.pending_preemptions() == 0


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_runs_of_the_waiting_class_filling_the_cap_stop_no_lower_run(r: redis.Redis) -> None:
    """The cap lowered to 1 with a class-7 run in flight: no stop of a class-2 run would let the waiting
    class-7 request start before that run ends, so none is stopped."""
    h = Harness(r)
    h.policy(min_run=0)
    h.add_worker("w", slots=4)
    mine = h.submit("m", tenant="B", priority=7, max_tokens=50)
    lows = [h.submit(f"l{i}", tenant="A", priority=2, max_tokens=50) for i in range(2)]
    h.advance(100)
    h.quota("default", max_concurrency=1)
    high = h.submit("h", tenant="B", priority=7)
    obey_stops(h)
    assert all(h.status(x) == "running" and not preempted_reasons(h, f"l{i}", x) for i, x in enumerate(lows))
    assert h.status(mine) == "running" and h.status(high) == "queued" and h.pending_preemptions() == 0


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_max_concurrency_lowered_below_the_runs_in_flight_stops_enough_for_a_higher_class(r: redis.Redis) -> None:
    """Three class-2 runs and the cap lowered to 2: the class-7 request starts once 3 - 2 + 1 = 2 of them let
    go. Both stop at once (the most recently started first), a later decision counts them and stops no third,
    and the waiting request starts when they have let go (CONTRACT: a waiting request of higher priority
    preempts lower-priority work when the group has no free slot). The old code stopped none while the runs
    were above the cap: the request waited for the class-2 runs to end by themselves."""
    h, lows = class_2_runs(r, 3, slots=4)
    h.quota("default", max_concurrency=2)
    high = h.submit("h", tenant="B", priority=7)
    stopped = [run for run in h.runs if h.status(run.rid) == "preempted"]
    assert [run.rid for run in stopped] == [lows[2], lows[1]] or [run.rid for run in stopped] == [lows[1], lows[2]]
    assert h.status(high) == "queued" and h.pending_preemptions() == 2  # counted until their workers let go
    h.sweep()  # a decision while both are being stopped: no third stop
    assert h.status(lows[0]) == "running" and h.pending_preemptions() == 2
    h.handback(stopped[0], reason="priority")
    h.sweep()
    assert h.status(high) == "queued"  # one run and one being stopped: still at the cap of 2
    assert h.status(lows[0]) == "running" and h.pending_preemptions() == 1
    h.handback(stopped[1], reason="priority")
    h.sweep()
    assert h.status(high) == "running" and len(h.running()) == 2 and h.pending_preemptions() == 0
    assert [h.status(x) for x in lows] == ["running", "preempted", "preempted"]
    assert not preempted_reasons(h, "l0", lows[0])


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
@pytest.mark.parametrize("immune", ["pinned", "max_preemptions"])
def test_a_lowered_cap_filled_by_runs_no_stop_can_take_stops_none(r: redis.Redis, immune: str) -> None:
    """Five class-2 runs, two of them immune (pinned, or at --max-preemptions), and the cap lowered to 2: the
    two immune runs fill it, so no stop below the class could let the class-7 request start. None stops, and
    the runs go on (a stop would only be followed by its restart being held at the cap). The first form of
    the lowered-cap stops counted only the runs of the waiting class or above: all three others stopped, and
    nothing started."""
    h, lows = class_2_runs(r, 5, slots=6, max_pre=1)
    for rid in lows[:2]:
        if immune == "pinned":
            assert run_sync(h.t.pin("default", rid, h.run_of(rid).attempt))
        else:
            h.set_preemptions(rid, 1)
    h.quota("default", max_concurrency=2)
    high = h.submit("h", tenant="B", priority=7)
    h.sweep()
    assert h.pending_preemptions() == 0
    assert [h.status(x) for x in lows] == ["running"] * 5 and h.status(high) == "queued"
    assert not any(preempted_reasons(h, f"l{i}", rid) for i, rid in enumerate(lows))


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_max_concurrency_at_the_runs_in_flight_stops_one_for_a_higher_class(r: redis.Redis) -> None:
    h, lows = class_2_runs(r, 3, slots=4)
    h.quota("default", max_concurrency=3)
    high = h.submit("h", tenant="B", priority=7)
    stopped = [run for run in h.runs if h.status(run.rid) == "preempted"]
    assert [run.rid for run in stopped] == [lows[2]]  # the most recently started
    # under the cap the stopped run counts until its worker lets go: no slot is handed over
    assert h.status(high) == "queued" and h.pending_preemptions() == 1
    h.handback(stopped[0], reason="priority")
    h.sweep()
    assert h.status(high) == "running" and len(h.running()) == 3 and h.pending_preemptions() == 0
    assert [h.status(x) for x in lows] == ["running", "running", "preempted"]
