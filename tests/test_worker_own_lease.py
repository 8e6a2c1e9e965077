"""A worker's own lease governs its runs. Each process has its own --lease-seconds and
--heartbeat-seconds, and a worker renews its runs on its own beat. A run's first lease and the sweep's
lost-worker test therefore go by the lease the worker recorded when it registered or last beat, not by
the lease of whichever process dispatched or swept. Otherwise a worker with a longer lease than the API's
and the scheduler's (valid for itself) would have healthy runs lapse and be counted `worker_lost` before
its first heartbeat. A worker that recorded none (an older version) is judged by the caller's lease, as
before.

Driven through the real scripts (tests/sched_harness.py): on one server with the clock pinned, and by the
cluster protocol on the servers' own clock."""

from __future__ import annotations

import time

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import Transitions, run_sync
from tests.helpers import ON_CLUSTER
from tests.sched_harness import TTL, Harness

DISPATCH_LEASE = 2_500  # the API's and the scheduler's --lease-seconds (the default), ms
OWN_LEASE = 12_000  # the worker's --lease-seconds 12 (valid with its --heartbeat-seconds 4)
BEAT = 4_000


def preempted(h: Harness, sid: str, rid: str) -> list[tuple[str, int]]:
    return [(e.data["reason"], e.data["index"]) for e in h.events(sid, rid) if e.event == "preempted"]


def recorded_lease(h: Harness, wid: str) -> str | None:
    return h.r.hget(keys.group_key("default", "wl"), wid)


# The clock is pinned through a global key, which a cluster's functions may not read (tests/conftest.py).
@pytest.mark.single_server
def test_a_run_outlives_the_dispatchers_lease_and_is_lost_only_past_its_workers_own(r: redis.Redis) -> None:
    h = Harness(r, lease_ms=DISPATCH_LEASE)
    h.add_worker("w0", slots=1, lease_ms=OWN_LEASE)
    rid = h.submit("s", max_tokens=20)  # dispatched by the API's call, with the API's lease
    run = h.run_of(rid)
    h.append(run, 2)
    # The worker's first heartbeat is due one beat on: the dispatcher's lease has passed by then, and so has 90%
    # of it since the worker's last beat, but the worker's own lease has not.
    h.advance(BEAT)
    assert h.sweep()[0] == 0
    assert h.status(rid) == "running" and h.append(run, 2)[0] == 1
    assert h.heartbeat("w0") == []
    for _ in range(3):  # it goes on beating on its own period
        h.advance(BEAT)
        assert h.sweep()[0] == 0
        assert h.heartbeat("w0") == []
    assert h.append(run, 2)[0] == 1
    assert preempted(h, "s", rid) == [] and not h.req(rid).get("fl")
    # It stops beating: its run lapses once the worker's own lease has passed, and the worker is lost, counted.
    h.advance(OWN_LEASE - 1)
    assert h.sweep()[0] == 0 and h.status(rid) == "running"
    h.advance(1)
    assert h.sweep()[0] == 1
    assert preempted(h, "s", rid) == [("worker_lost", 6)]
    assert h.req(rid)["fl"] == "1"
    assert not r.exists(keys.worker("default", "w0")) and recorded_lease(h, "w0") is None  # retired


@pytest.mark.single_server  # the pinned clock, as above
def test_the_sweep_judges_whether_a_worker_is_lost_by_the_workers_own_lease(r: redis.Redis) -> None:
    h = Harness(r, lease_ms=DISPATCH_LEASE)
    h.add_worker("w0", slots=1, lease_ms=OWN_LEASE)
    rid = h.submit("s", max_tokens=20)
    run = h.run_of(rid)
    h.append(run, 1)
    # The worker beats without the run (its assignment waits behind a busy event loop), and the run's lease
    # lapses. The last beat is 4 s old at the sweep: past 90% of the dispatcher's lease, within 90% of the
    # worker's own. A worker heard from is slow, not lost: the stop does not count and it keeps its slots.
    h.advance(OWN_LEASE - BEAT)
    assert run_sync(h.t.heartbeat("default", "w0", [], lease_ms=OWN_LEASE)) == (False, [])
    h.advance(BEAT)
    assert h.sweep()[0] == 1
    assert preempted(h, "s", rid) == [("lease_lapsed", 1)]
    assert not h.req(rid).get("fl")
    assert r.exists(keys.worker("default", "w0")) and recorded_lease(h, "w0") == str(OWN_LEASE)
    # It learns at its next beat that it lost the run and lets go of it; the request resumes in the freed slot.
    assert h.heartbeat("w0") == [f"{rid}|1"]
    h.handback(run, reason="released")
    resumed = h.run_of(rid)
    assert (resumed.wid, resumed.attempt) == ("w0", "2")
    # Not heard from for 90% of its own lease (nor beating with this run): lost, and counted.
    h.advance(OWN_LEASE)
    assert h.sweep()[0] == 1
    assert preempted(h, "s", rid) == [("lease_lapsed", 1), ("worker_lost", 1)]
    assert h.req(rid)["fl"] == "1"


@pytest.mark.single_server  # the pinned clock, as above
def test_a_worker_that_records_no_lease_is_judged_by_the_callers(r: redis.Redis) -> None:
    """A worker of an older version records no lease: the lease of the process that dispatches or sweeps
    governs its runs, as before."""
    h = Harness(r, lease_ms=DISPATCH_LEASE)
    h.add_worker("old", slots=1)  # records none (see Harness.add_worker)
    assert recorded_lease(h, "old") is None
    rid = h.submit("s", max_tokens=20)
    h.append(h.run_of(rid), 1)
    h.advance(DISPATCH_LEASE - 1)
    assert h.sweep()[0] == 0
    h.advance(1)
    assert h.sweep()[0] == 1
    assert preempted(h, "s", rid) == [("worker_lost", 1)]


def test_the_recorded_lease_goes_with_the_worker(r: redis.Redis) -> None:
    """Removed when the worker deregisters, and when another worker's heartbeat reaps it."""
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w0", slots=1, lease_ms=OWN_LEASE)
    h.add_worker("w1", slots=1, lease_ms=OWN_LEASE)
    h.add_worker("w2", slots=1, lease_ms=OWN_LEASE)
    assert [recorded_lease(h, w) for w in ("w0", "w1", "w2")] == [str(OWN_LEASE)] * 3
    run_sync(Transitions(h.scripts, lease_ms=OWN_LEASE, session_ttl=TTL).register_worker(
        "default", "w0", free=0, total=0))  # w0 leaves
    assert recorded_lease(h, "w0") is None
    # w1 stopped beating long ago (kill -9): its liveness key is gone and its roster entry is old
    r.delete(keys.worker("default", "w1"))
    r.zadd(keys.group_key("default", "wk"), {"w1": 0})
    h.heartbeat("w2")
    assert recorded_lease(h, "w1") is None and recorded_lease(h, "w2") == str(OWN_LEASE)


# On the servers' own clock (the cluster protocol): short leases, so that the test waits for them.
REAL_DISPATCH_LEASE = 300
REAL_OWN_LEASE = 4_000


def outlives_on_the_servers_clock(h: Harness) -> None:
    h.add_worker("w0", slots=1, lease_ms=REAL_OWN_LEASE)
    dispatched = time.monotonic()
    rid = h.submit("s", max_tokens=20)
    run = h.run_of(rid)
    h.append(run, 2)
    time.sleep(0.8)  # past the dispatcher's lease, well within the worker's own
    assert h.sweep()[0] == 0
    assert h.status(rid) == "running" and h.append(run, 2)[0] == 1
    assert preempted(h, "s", rid) == []
    # no heartbeat: lost once the worker's own lease has passed
    time.sleep(max(0.0, dispatched + REAL_OWN_LEASE / 1000 + 0.3 - time.monotonic()))
    assert h.sweep()[0] == 1
    assert preempted(h, "s", rid) == [("worker_lost", 4)]
    assert h.req(rid)["fl"] == "1"


@pytest.mark.own_servers  # its own cluster: the protocol proved in the single-server pass too
def test_a_run_outlives_the_dispatchers_lease_on_a_cluster(rc: RedisCluster) -> None:
    outlives_on_the_servers_clock(Harness(rc, lease_ms=REAL_DISPATCH_LEASE, cluster=True))


@pytest.mark.skipif(not ON_CLUSTER, reason="the cluster pass (SLUICEGATE_TEST_CLUSTER=1); the test above covers one")
def test_a_run_outlives_the_dispatchers_lease_in_the_cluster_pass(r: redis.Redis) -> None:
    outlives_on_the_servers_clock(Harness(r, lease_ms=REAL_DISPATCH_LEASE, cluster=True))
