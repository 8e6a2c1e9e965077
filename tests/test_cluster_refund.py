"""The cluster protocol (one call per plane; on one server too, and on the cluster in its pass): a preempted
request that restarts before its old worker's hand-back fences the old attempt at that start; the late
hand-back still reconciles the old attempt's charges with the tokens it produced (the tenant's counter,
the token bucket's reservation), not with the estimate."""

from __future__ import annotations

import pytest
import redis

from sluicegate.sessions import keys
from tests.sched_harness import Harness

BURST = 10_000


def test_a_late_hand_back_refunds_what_the_fenced_attempt_did_not_produce(r: redis.Redis) -> None:
    h = Harness(r, lease_ms=60_000, cluster=True)
    h.policy(min_run=0, w_in=0, w_out=1, est=1.0)
    h.add_worker("w1", slots=1)
    # no refill to speak of: the bucket's level is what was charged
    r.hset(keys.group_key("default", "cfg"), mapping={"tokens_per_second": 1e-6, "burst_tokens": BURST})
    x = h.submit("x", tenant="X", priority=2, max_tokens=100)
    h.append(h.run_of(x), 10)  # attempt 1 produces 10 of its reserved 100
    h.add_worker("w2", slots=1)
    y = h.submit("y", tenant="Y", priority=5, max_tokens=5)
    hi = h.submit("h", tenant="H", priority=7, max_tokens=5)  # preempts x: requeued, its worker told
    # h takes x's slot on w1 at once; on the data plane x's attempt 1 runs until w1's hand-back
    assert h.status(hi) == "running" and h.run_of(hi).wid == "w1"
    assert (h.status(x), h.req(x)["a"]) == ("running", "1")
    h.complete(y)  # x's attempt 2 starts in w2's slot before w1's hand-back: that start fences attempt 1
    assert h.req(x)["a"] == "2"
    assert [e.data["reason"] for e in h.events("x", x) if e.event == "preempted"] == ["priority"]
    old = next(run for run in h.runs if run.rid == x and run.attempt == "1")
    h.handback(old, reason="priority")  # late
    h.complete(hi)
    h.complete(x)
    assert h.req(x)["n"] == "100"
    assert h.vtc("X") == pytest.approx(100)  # charged 100 + 90 by estimate; attempt 1 produced 10, not 100
    level = float(r.hget(keys.group_key("default", "qs"), "lvl"))
    assert BURST - level == pytest.approx(100 + 5 + 5, abs=0.01)  # the tokens produced, no more
