"""The queue depth gauge counts exactly the requests that wait: from their submit, and from a stop that
puts them back, until they start or end. Counted by the data plane alone, by each request's status
(README, Design decisions), on one server and on a cluster. The scripts are driven directly
(tests/sched_harness.py); the cluster's windows between a control step and its data step are in
tests/test_cluster.py."""

from __future__ import annotations

import redis

from tests.helpers import ON_CLUSTER
from tests.metrics_helpers import raw_depths
from tests.sched_harness import Harness


def waiting(r: redis.Redis) -> dict[str, float]:
    """The depth by label, the labels at 0 left out."""
    return {label: n for label, n in raw_depths(r, ["default"]).items() if n}


def test_a_request_that_starts_at_once_is_never_counted_and_one_that_waits_is_until_it_starts(
        r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w1", slots=1)
    first = h.submit("s1", tenant="t", max_tokens=2)
    assert h.status(first) == "running" and waiting(r) == {}
    second = h.submit("s2", tenant="t", max_tokens=2)
    assert h.status(second) == "queued" and waiting(r) == {"depth|default|5|t": 1}
    h.complete(first)
    assert h.status(second) == "running" and waiting(r) == {}
    h.complete(second)
    assert h.status(second) == "done" and waiting(r) == {}


def test_a_preempted_request_counts_waiting_until_it_resumes(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    h.policy(min_run=0)
    h.add_worker("w1", slots=1)
    low = h.submit("a", priority=1, tenant="t", max_tokens=6)
    h.append(h.run_of(low), 2)
    high = h.submit("b", priority=8, tenant="u", max_tokens=2)
    # the worker lets go (on a cluster its hand-back is where the data plane learns of the preemption;
    # one server fenced the run in the decision's own call), and its slot goes to `high`
    h.handback(h.run_of(low), reason="priority")
    assert h.status(low) == "preempted" and h.status(high) == "running"
    assert waiting(r) == {"depth|default|1|t": 1}
    h.complete(high)
    assert h.status(low) == "running" and waiting(r) == {}
    h.complete(low)
    assert h.status(low) == "done" and waiting(r) == {}
