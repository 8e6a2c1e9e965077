"""Idle tenants' fairness counters end: the sweep forgets (HDEL vtc) the counter of a tenant with no backlog
and no run, idle for a session TTL, once it is at or below the floor its return would lift it to (the least
backlogged counter, or the last one charged), a bounded batch a pass. Forgetting changes nothing: a forgotten
tenant returns as a fresh one does, and a tenant whose counter is above the floor (it used more) keeps it
until the floor passes it. Before, vtc kept a field for every tenant name ever sent, for good, and every
admin stats read grew with them."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions import keys
from sluicegate.sessions.transitions import Transitions, run_sync
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness

PROMPT = "x" * 40  # 10 input tokens: a run of max_tokens 10 is charged 10 + 2 * 10 = 30
MANY = 700  # more fields than a listpack hash holds (hash-max-listpack-entries, 512 by default)
GRACE_S = 1  # the sweeps here run with a session TTL of 1 s: how long a tenant stays idle before it may go


class Sweeper:
    """The harness's sweep with a short session TTL (only the sweep's: the harness's sessions keep theirs),
    and the wait past it, on the pinned clock (one server) or the servers' own (a cluster)."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.t = Transitions(h.scripts, lease_ms=h.lease_ms, session_ttl=GRACE_S)

    def sweep(self, times: int = 1) -> None:
        for _ in range(times):
            run_sync(self.t.sweep("default"))

    def wait_grace(self) -> None:
        if ON_CLUSTER:
            time.sleep(GRACE_S + 0.05)
        else:
            self.h.advance(GRACE_S * 1000)


def counters(r: redis.Redis) -> dict[str, float]:
    return {t: float(v) for t, v in r.hgetall(keys.group_key("default", "vtc")).items()}


def marks(r: redis.Redis) -> int:
    return r.zcard(keys.group_key("default", "vi"))


def serve_one_each(h: Harness, tenants: list[str]) -> None:
    """Each tenant submits one request and is served (one slot: one after the other)."""
    for tenant in tenants:
        h.submit(f"s-{tenant}", tenant=tenant, prompt=PROMPT)
        h.complete(h.runs[0].rid)


def test_idle_tenants_counters_are_forgotten_and_the_active_ones_kept(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    s = Sweeper(h)
    h.add_worker("w1", slots=1)
    serve_one_each(h, [f"t{i}" for i in range(50)])
    running = h.submit("run", tenant="busy", prompt=PROMPT)  # holds the slot
    h.submit("wait", tenant="queued", prompt=PROMPT)  # waits behind it: backlogged
    s.sweep(2)  # one page of 52 fields (a listpack answers whole): 50 a pass
    assert len(counters(r)) == 52  # idle, but not for a grace yet: kept
    s.wait_grace()
    s.sweep(2)
    assert sorted(counters(r)) == ["busy", "queued"]  # [52 fields before the fix: nothing ever forgot one]
    assert marks(r) == 0  # the forgotten ones' marks went with them
    assert r.zrange(keys.group_key("default", "ro"), 0, -1) == ["busy"]  # companions already end with use
    assert r.hkeys(keys.group_key("default", "btn")) == ["queued"]
    h.complete(running)
    h.complete(h.runs[0].rid)
    s.sweep()
    s.wait_grace()
    s.sweep()
    assert counters(r) == {} and marks(r) == 0  # both idle now, at or below the floor [2 fields]


def test_a_large_hash_is_forgotten_a_bounded_batch_a_pass(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    s = Sweeper(h)
    h.add_worker("w1", slots=1)
    serve_one_each(h, [f"t{i}" for i in range(MANY)])  # past a listpack's size: HSCAN goes by its cursor
    s.sweep()
    assert 0 < marks(r) <= 200  # a batch noted, not the whole hash [0: no marks]
    s.sweep(40)
    assert marks(r) == MANY  # the cursor went round
    s.wait_grace()
    s.sweep()
    left = len(counters(r))
    assert MANY - 200 <= left < MANY  # a batch forgotten [700 left]
    s.sweep(40)
    assert counters(r) == {} and marks(r) == 0  # every idle one forgotten [700 left]


def test_a_small_hash_answering_whole_is_taken_a_bounded_batch_a_pass(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    s = Sweeper(h)
    h.add_worker("w1", slots=1)
    serve_one_each(h, [f"t{i}" for i in range(300)])  # a listpack: HSCAN answers all 300 whatever its COUNT
    s.sweep()
    assert marks(r) == 50  # one batch a pass, not the whole page [300: every field in one pass]
    s.sweep(5)
    assert marks(r) == 300  # the page's rest, a batch a pass
    s.wait_grace()
    s.sweep(6)
    assert counters(r) == {} and marks(r) == 0


def test_a_forgotten_tenant_returns_as_a_fresh_one(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    s = Sweeper(h)
    h.add_worker("w1", slots=1)
    serve_one_each(h, ["old"])
    for i in range(6):
        h.submit(f"a{i}", tenant="a", prompt=PROMPT)  # a backlog: the first runs, five wait
    h.complete(h.runs[0].rid)
    s.sweep()
    s.wait_grace()
    s.sweep()
    assert "old" not in counters(r)  # idle, below the floor: forgotten [kept: 30.0]
    least = counters(r)["a"]
    h.submit("o", tenant="old", prompt=PROMPT)
    h.submit("n", tenant="new", prompt=PROMPT)
    assert counters(r)["old"] == counters(r)["new"] == least  # both lifted to the least backlogged counter
    before = len(h.dispatched)
    for _ in range(3):
        h.complete(h.runs[0].rid)
    served = [r.hget(keys.request(run.rid), "tn") for run in h.dispatched[before:]]
    assert sorted(served[:3]) == ["a", "new", "old"]  # one each: no credit, no debt for the forgotten one


def test_a_counter_above_the_floor_stays_until_the_floor_passes_it(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    s = Sweeper(h)
    h.add_worker("w1", slots=2)
    for i in range(4):
        h.submit(f"a{i}", tenant="a", prompt=PROMPT)  # two run (30, 60), two wait: a backlogged at 60
    h.submit("heavy", tenant="heavy", prompt=PROMPT, max_tokens=100)  # lifted to 60, waits
    h.complete(h.runs[0].rid)  # a (60) goes first by name: 90
    h.complete(h.runs[0].rid)  # heavy (60) next: charged 10 + 2 * 100, 270
    heavy = next(run.rid for run in h.runs if r.hget(keys.request(run.rid), "tn") == "heavy")
    h.complete(heavy)
    assert counters(r)["heavy"] == 270 and counters(r)["a"] == 120  # a's last one runs
    s.sweep()
    s.wait_grace()
    s.sweep()
    assert counters(r)["heavy"] == 270  # idle, but above the floor (a's 120): it returns behind a, kept
    for run in list(h.runs):
        h.complete(run.rid)
    for i in range(5):
        h.submit(f"more{i}", tenant="a", prompt=PROMPT)  # a alone, lifted to the last counter: 150 ... 270
        h.complete(h.runs[0].rid)
        s.sweep()
        floor = float(r.get(keys.group_key("default", "vlast")))  # none backlogged: the last counter charged
        assert ("heavy" in counters(r)) == (floor < 270), (floor, counters(r))
    assert "heavy" not in counters(r)  # [kept for good before the fix]


def test_admin_tenants_lists_a_forgotten_tenant_by_its_weight_without_a_counter(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    s = Sweeper(h)
    h.add_worker("w1", slots=1)
    h.set_weight("weighted", 2.0)
    serve_one_each(h, ["weighted", "anon"])
    s.sweep()
    s.wait_grace()
    s.sweep()
    listed: list[list[dict[str, Any]]] = []

    async def read(tuning: Tuning) -> None:
        listed.append(await tuning.tenants())

    h._tune(read)
    assert [(t["tenant"], t["weight"], t["virtual_token_counter"]) for t in listed[0]] == [
        ("weighted", 2.0, {})]  # the same shape; an anonymous idle tenant is gone [both, with their counters]


@pytest.mark.skipif(not ON_CLUSTER, reason="one server closes a cancelled run's accounting in the cancel itself")
def test_a_tenant_whose_cancelled_run_is_not_yet_let_go_keeps_its_counter(r: redis.Redis) -> None:
    """A cluster cancel stops the run (its tenant holds no running run) and its worker lets go later: until
    then the run's record stands, and its end corrects the tenant's counter, which is kept for it."""
    h = Harness(r, cluster=True)
    s = Sweeper(h)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", tenant="t", prompt=PROMPT)  # runs alone: 0 -> 30, the last counter charged
    h.append(h.run_of(rid), 2)
    h.cancel(rid)
    s.sweep()
    s.wait_grace()
    s.sweep()
    assert counters(r) == {"t": 30}  # its run record stands: kept [forgotten while the run waited to be let go]
    h.handback(h.run_of(rid), reason="cancelled")  # produced 2 of 10: 16 given back
    assert counters(r) == {"t": 30 - 2 * 8}
    s.sweep()
    s.wait_grace()
    s.sweep()
    assert counters(r) == {}  # let go, idle, below the floor (30): forgotten now


USAGE_500_IN = {"prompt_tokens": 500, "completion_tokens": 10, "total_tokens": 510}


def test_a_counter_the_floor_may_yet_fall_below_is_kept(r: redis.Redis) -> None:
    """The floor can fall: a backlogged tenant's run that ends with less than it was charged is refunded. A
    counter at or below the floor now but above where a refund may take it is kept: forgotten, it would come
    back lifted to less than it stood at, its counted tokens forgiven."""
    h = Harness(r, cluster=ON_CLUSTER)
    s = Sweeper(h)
    h.add_worker("w1", slots=1)
    x = h.submit("sx", tenant="X", prompt=PROMPT, max_tokens=10)
    run = h.run_of(x)
    h.append(run, 10)
    h.runs.remove(run)
    run_sync(h.t.finish(run.rid, run.attempt, wid=run.wid, group=run.group, outcome="done", detail="length",
                        return_slot=True, usage=USAGE_500_IN))
    h.collect()
    assert counters(r) == {"X": 520}  # the backend counted 500 input tokens (the estimate: 10)
    long = h.submit("sa", tenant="L", prompt=PROMPT, max_tokens=300)  # charged 10 + 2 * 300: L at 640
    h.submit("sb", tenant="L", prompt=PROMPT, max_tokens=10, priority=1)  # L backlogged: the floor is 640
    s.sweep()
    s.wait_grace()
    s.sweep()
    assert "X" in counters(r)  # 520 <= 640, but L's run may be refunded to 40 [forgotten]
    h.submit("sh", tenant="H", prompt=PROMPT, max_tokens=10, priority=5)
    h.finish(h.run_of(long), detail="stop")  # nothing produced: L refunded to 40, the floor with it
    h.submit("sx2", tenant="X", prompt=PROMPT, max_tokens=10, priority=1)
    assert counters(r)["X"] == 520  # X queues behind L, as it stood [40: 480 of its tokens forgiven]
