"""A deadline boost binds only until the first token: a request the sweep raised a class, and that started at
that class, ranks at its own class again once the control plane sees its first token (one server), or its
deadline pass (on a cluster, where the control plane sees no token), at the worker's next heartbeat
(scheduler/lua/includes/runs.lua unboost_run). Its run kept the raised rank for its whole length: a request of
the raised class, waiting when the boost fired, could not preempt it and waited out its whole run; and it
showed the raised class as its effective_priority."""

from __future__ import annotations

import time

import pytest
import redis

from sluicegate.sessions import keys
from tests.sched_harness import Harness

G = "default"
RANK = 1e13  # running-rank score = class * RANK + (RANK - start ms) (runs.lua)
SINGLE = pytest.mark.single_server  # the pinned clock: a global key, which a cluster's functions cannot read


def run_class(r: redis.Redis, rid: str) -> int:
    """The class the request's running run ranks at, in the group's running set and in its tenant's."""
    [(key, score)] = [(k, s) for k, s in r.zrange(keys.group_key(G, "run"), 0, -1, withscores=True)
                      if k.rpartition("|")[0] == rid]
    tenant = r.hget(keys.request(rid), "tn")
    assert r.zscore(keys.group_key(G, f"rt:{tenant}"), key) == score
    return int(score // RANK)


def boosted_start(h: Harness, *, deadline_ms: int) -> tuple[str, str, str]:
    """One slot; a class-7 run ahead of a class-6 request and a class-5 request with a deadline, which the
    sweep raises to 6 (the highest class with work). When the class-7 run ends, the raised request starts (its
    tenant is first in the fair order). Returns (the class-7 request, the class-6 one, the raised one)."""
    h.add_worker("w1", slots=1)
    blocker = h.submit("blocker", tenant="other", priority=7, max_tokens=1000)
    h6 = h.submit("s-h6", tenant="other", priority=6, max_tokens=10)
    raised = h.submit("s-low", tenant="a", priority=5, max_tokens=1000, deadline_ms=deadline_ms)
    return blocker, h6, raised


@SINGLE
def test_a_boosted_run_ranks_at_its_own_class_after_its_first_token(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(dlw=500, dlb=1, min_run=50)
    blocker, h6, s = boosted_start(h, deadline_ms=1000)
    h.advance(600)  # 400 ms of slack left, within the promote window
    assert h.sweep()[1] == 1 and h.req(s)["ep"] == "6"
    h.complete(blocker)
    assert h.status(s) == "running" and h.status(h6) == "queued"
    assert run_class(r, s) == 6
    h.heartbeat("w1")  # no first token yet, deadline ahead: the boost still binds
    h.advance(100)  # past the min-run quantum
    h.sweep()
    assert run_class(r, s) == 6 and h.status(s) == "running" and h.status(h6) == "queued"
    assert h.append(h.run_of(s), 5)[0] == 1  # its first token, 300 ms before its deadline
    h.heartbeat("w1")
    assert run_class(r, s) == 5 and h.req(s)["ep"] == "5"
    h.sweep()
    assert h.status(h6) == "running"  # class 6 outranks a class-5 run whose boost no longer binds
    assert h.status(s) == "preempted"


@SINGLE
def test_a_boosted_run_keeps_its_class_until_its_first_token(r: redis.Redis) -> None:
    """Before its first token and its deadline a boosted run is not stopped for the class it was raised into."""
    h = Harness(r)
    h.policy(dlw=5000, dlb=1, min_run=50)
    blocker, h6, s = boosted_start(h, deadline_ms=10_000)
    h.advance(5000)  # 5 s of slack left, within the promote window
    assert h.sweep()[1] == 1
    h.complete(blocker)
    assert h.status(s) == "running"
    for _ in range(5):
        h.advance(500)
        h.heartbeat("w1")
        h.sweep()
    assert run_class(r, s) == 6 and h.req(s)["ep"] == "6"
    assert h.status(s) == "running" and h.status(h6) == "queued"


@pytest.mark.parametrize("cluster", [pytest.param(False, marks=SINGLE), True])
def test_a_boosted_run_ranks_at_its_own_class_once_its_deadline_passed(r: redis.Redis, cluster: bool) -> None:
    """The control plane of a cluster sees no token: a boost, which can no longer help a late request (the
    sweep raises none), goes at the deadline. On the pinned clock (one server) and on the servers' own."""
    h = Harness(r, cluster=cluster)
    h.policy(dlw=60_000, dlb=1, min_run=0)  # its slack is short enough at once: the next sweep raises it
    deadline_ms = 300
    blocker, h6, s = boosted_start(h, deadline_ms=deadline_ms)
    assert h.sweep()[1] == 1
    h.complete(blocker)
    assert h.status(s) == "running" and run_class(r, s) == 6
    if cluster:
        time.sleep(deadline_ms / 1000 + 0.1)  # the servers' clock
    else:
        h.advance(deadline_ms + 1)
    h.heartbeat("w1")
    assert run_class(r, s) == 5
    if cluster:  # written on the data plane by the scheduler that sweeps next (scheduler/loop.py)
        assert r.lrange(keys.group_key(G, "epw"), -1, -1) == [f"{s}|5"]
    else:
        assert h.req(s)["ep"] == "5"
    h.sweep()
    if cluster:  # the worker's hand-back of the stopped run frees the slot
        h.handback(h.run_of(s), reason="priority")
    assert h.status(h6) == "running"
    assert h.status(s) == "preempted"
