"""One call dispatches at most DISPATCH_ROUNDS requests (scheduler/lua/includes/dispatch.lua); what it
leaves waiting beside free slots wakes the group's scheduler at once (its hint), instead of waiting
for the periodic sweep (DESIGN, scheduling policy 8: a freed slot wakes the scheduler at once)."""

from __future__ import annotations

import pytest
import redis

from sluicegate.sessions import keys
from tests.sched_harness import Harness

pytestmark = pytest.mark.single_server  # the deterministic harness pins the clock (a global key)


def test_work_left_by_a_full_dispatch_wakes_the_scheduler_at_once(r: redis.Redis) -> None:
    h = Harness(r)
    for i in range(150):
        h.submit(f"s{i}", tenant=f"t{i % 5}")
    hint = keys.group_key("default", "hint")
    r.delete(hint)
    assert h.add_worker("w1", slots=120) == 64  # one call's rounds
    assert r.llen(hint) == 1  # the scheduler's watcher pops it and sweeps
    _, _, started, wake, now = h.sweep()
    assert started == 56 and len(h.running()) == 120
    assert wake == -1 or wake > now  # nothing left beside a free slot: no sweep at once again
    assert r.llen(hint) == 0


def test_a_sweep_cut_short_by_its_rounds_asks_for_the_next_at_once(r: redis.Redis) -> None:
    h = Harness(r)
    for i in range(300):
        h.submit(f"s{i}", tenant=f"t{i % 5}")
    assert h.add_worker("w1", slots=200) == 64
    for expected in (64, 64):
        _, _, started, wake, now = h.sweep()
        assert (started, wake) == (expected, now)  # the loop sweeps again without waiting for its timer
    _, _, started, wake, now = h.sweep()
    assert started == 8 and len(h.running()) == 200
    assert wake == -1 or wake > now
