"""A deadline binds until the first token (sessions/lua/includes/requests.lua ready_spec): a request preempted
after it waits again without one, on a cluster as on one server. On a cluster the control plane requeues it
at the preemption, before the data plane's view arrives with the hand-back; that release re-ranks it without
the deadline, or the deadline sweep would raise it above its class, ahead of same-class work (a priority
inversion), and with "fail" could try to end it."""

from __future__ import annotations

import pytest
import redis

from sluicegate.sessions import keys
from tests.sched_harness import Harness

G = "default"
STORED_DL = 12  # where a stored ready spec keeps dl, then dm (scheduler/lua/includes/ready_specs.lua STORED_SPEC)


def stored_deadline(r: redis.Redis, sid: str) -> tuple[str, str]:
    """The (dl, dm) of a session's ready entry, as stored ('' when absent)."""
    values = r.hget(keys.group_key(G, "rq"), sid).split("|") + [""] * 17
    return values[STORED_DL], values[STORED_DL + 1]


@pytest.mark.parametrize("cluster", [pytest.param(False, marks=pytest.mark.single_server), True])
def test_a_request_preempted_after_its_first_token_waits_without_its_deadline(r: redis.Redis, cluster: bool) -> None:
    h = Harness(r, cluster=cluster)
    h.add_worker("w", slots=1)
    # a promotion window as long as the deadline: a request still holding it is boosted at the next sweep
    h.policy(min_run=0, dlw=60_000)
    a = h.submit("a", tenant="ta", priority=3, max_tokens=50, deadline_ms=60_000, fail_on_miss=True)
    run = h.run_of(a)
    assert h.append(run, 3)[0] == 1  # its first token: the deadline is met, and binds no more
    hi = h.submit("hi", tenant="tc", priority=7, max_tokens=5)  # preempts a
    h.handback(run, reason="priority")  # on a cluster: the data plane's view reaches the control plane
    assert h.status(a) == "preempted" and h.running() == [hi]
    assert stored_deadline(r, "a") == ("", "")
    assert r.zscore(keys.group_key(G, "dlp"), "a") is None and r.zscore(keys.group_key(G, "dld"), "a") is None
    hi2 = h.submit("hi2", tenant="tc", priority=7, max_tokens=5)
    b = h.submit("b", tenant="aa", priority=3, max_tokens=5)  # a's class; its tenant first in the fair order
    assert h.sweep()[1] == 0  # nothing raised: a's deadline no longer binds
    h.complete(hi)
    h.complete(hi2)
    # the class-3 work in the fair order ("aa" before "ta" at equal counters), a no longer ahead of it
    assert h.dispatched_rids()[-1] == b and h.running() == [b]
    h.complete(b)
    assert h.running() == [a] and h.status(a) == "running"
