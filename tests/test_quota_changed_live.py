"""A quota changed while the group runs binds from the next decision, and only by what was taken under it.

- A tokens/s quota added while runs are in flight: those runs reserved nothing from its bucket, so their ends
  give it nothing back (they credited their whole unused budget: the group overran the new quota at once).
- A requests/s rate lowered: the debt rescaled to the new interval is kept even when the gate refuses (it
  was recomputed from the old interval's stored time at each decision, and admitted once that time passed).
"""

from __future__ import annotations

import pytest
import redis

from sluicegate.sessions import keys
from tests.sched_harness import T0, Harness

pytestmark = pytest.mark.single_server  # the pinned clock: a global key, which a cluster's functions cannot read


def test_runs_from_before_a_tokens_quota_give_its_bucket_nothing_back(r: redis.Redis) -> None:
    h = Harness(r)
    h.add_worker("w", slots=10)
    old = [h.submit(f"o{i}", tenant="t", max_tokens=1000) for i in range(3)]
    assert len(h.running()) == 3
    h.quota("default", tokens_per_second=10, burst_tokens=1000)  # added while the three run
    new = [h.submit(f"n{i}", tenant="t", max_tokens=1000) for i in range(3)]
    assert [h.status(x) for x in new] == ["running", "queued", "queued"]  # the first took the whole bucket
    for rid in old:
        h.stop_after(rid, 10)  # 990 of 1,000 unused: reserved from no bucket
    h.sweep()  # the clock has not moved: the bucket has refilled nothing
    assert [h.status(x) for x in new] == ["running", "queued", "queued"]
    assert float(r.hget(keys.group_key("default", "qs"), "lvl")) <= 0


def test_a_run_under_the_tokens_quota_still_gives_back_what_it_did_not_use(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("default", tokens_per_second=10, burst_tokens=1000)
    h.add_worker("w", slots=10)
    first = h.submit("a", tenant="t", max_tokens=1000)
    second = h.submit("b", tenant="t", max_tokens=900)
    assert (h.status(first), h.status(second)) == ("running", "queued")
    h.stop_after(first, 10)  # 990 unused go back: the second fits
    assert h.status(second) == "running"


def test_a_lowered_rate_keeps_its_rescaled_debt_when_the_gate_refuses(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("default", requests_per_second=100, burst=10)
    h.add_worker("w", slots=100)
    for i in range(40):
        h.submit(f"s{i:02d}", max_tokens=10)
    assert len(h.dispatched) == 10  # the burst: its debt runs to T0 + 100 ms at 10 ms a request
    h.quota("default", requests_per_second=1, burst=1)  # the same debt at 1 s a request: to T0 + 10 s
    h.set_clock(T0 + 50)
    assert h.sweep()[2] == 0  # refused
    h.set_clock(T0 + 101)  # the old interval's time has passed
    assert h.sweep()[2] == 0
    h.set_clock(T0 + 1101)
    assert h.sweep()[2] == 0
    assert len(h.dispatched) == 10
    h.set_clock(T0 + 10_001)  # the rescaled debt paid: one a second from here
    assert h.sweep()[2] == 1
