"""A store outage is no failed attempt. While Valkey is down (a restart from its AOF, a failover) no worker can
heartbeat; when it comes back every liveness key has expired and every lease lapsed, though every worker lives.
The sweep must not retire them all as lost and count `worker_lost` against every request in flight (with
--max-attempts 1 each would fail): the first sweep after the store's library (re)loaded gives the workers one
lease of grace, counting their silence from then (scheduler/lua/includes/runs.lua store_grace). A worker still
silent a lease later is lost, and counted, as before.

End to end on a server killed and restarted (one server); and through the real scripts
(tests/sched_harness.py), the library loaded again standing in for the restart, on one server with the clock
pinned and in the cluster pass on the servers' own clock."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.embedded import EmbeddedServer
from sluicegate.sessions import keys
from sluicegate.sessions.library import library_source
from tests.helpers import ON_CLUSTER, SseEvent, Stack, call, fast_settings, sse, wait_for
from tests.sched_harness import Harness
from tests.test_durability import server  # noqa: F401 (fixture)

LEASE = 600  # the harness's leases (ms): on the servers' own clock in the cluster pass, so the test waits


@pytest.mark.single_server  # crashes and restarts its own server (tests/test_durability.py)
def test_a_restart_longer_than_a_lease_costs_no_attempt(server: EmbeddedServer) -> None:  # noqa: F811
    """Two workers (one slot each) stream a request each; the server is down 3 s (leases 1.5 s). With
    --max-attempts 1, a restart counted as a lost worker failed both requests (`worker_lost`)."""
    stack = Stack(fast_settings(server.url, max_attempts=1, slots=1)).start(workers=2)
    try:
        base = stack.base_url
        rids = [call("POST", f"{base}/v1/sessions/inflight{i}/requests", {"prompt": "long", "max_tokens": 1200})[1]
                ["request_id"] for i in range(2)]
        received: dict[str, list[SseEvent]] = {rid: [] for rid in rids}
        listeners = [threading.Thread(target=lambda rid=rid: received[rid].extend(
            sse(base, f"/v1/requests/{rid}/events", timeout=60)), daemon=True) for rid in rids]
        for listener in listeners:
            listener.start()
        wait_for(lambda: all(len(received[rid]) > 40 for rid in rids), what="tokens of both before the crash")
        server.kill()  # kill -9
        server.process = None
        time.sleep(3.0)  # a supervisor restarting it: every lease and liveness key lapses meanwhile
        server.start()  # same port, same data dir
        for listener in listeners:
            listener.join(40)
        for rid in rids:
            events = received[rid]
            if events[-1].event not in ("done", "error"):  # the stream was cut by the crash: resume
                events += list(sse(base, f"/v1/requests/{rid}/events", last_id=events[-1].id, timeout=40))
            assert [(e.event, e.data) for e in events if e.event in ("preempted", "error")] == []
            code, view = call("GET", f"{base}/v1/requests/{rid}")
            assert view["status"] == "done" and view["tokens"] == 1200, view
            assert [e.data["index"] for e in events if e.event == "token"] == list(range(1200))
    finally:
        stack.stop()


def reload_library(r: redis.Redis | RedisCluster) -> None:
    """What a restart or a failover does to the library: loaded anew, its locals reset."""
    if isinstance(r, RedisCluster):
        for node in r.get_primaries():
            r.execute_command("FUNCTION", "LOAD", "REPLACE", library_source(), target_nodes=node)
    else:
        r.execute_command("FUNCTION", "LOAD", "REPLACE", library_source())


def wait(h: Harness, ms: int) -> None:
    """Time passes: the pinned clock on one server, the servers' own in the cluster pass."""
    if ON_CLUSTER:
        time.sleep(ms / 1000)
    else:
        h.advance(ms)


def preempted(h: Harness, sid: str, rid: str) -> list[tuple[str, int]]:
    return [(e.data["reason"], e.data["index"]) for e in h.events(sid, rid) if e.event == "preempted"]


def outage(r: redis.Redis | RedisCluster) -> tuple[Harness, str]:
    """A run streams on w0 and the group is swept; then the store is down for longer than a lease (no beat:
    the worker's liveness key expired) and comes back."""
    h = Harness(r, lease_ms=LEASE, cluster=ON_CLUSTER)
    h.add_worker("w0", slots=1)
    rid = h.submit("s", max_tokens=10)
    h.append(h.run_of(rid), 2)
    assert h.sweep()[0] == 0
    wait(h, 2 * LEASE)
    r.delete(keys.worker("default", "w0"))
    reload_library(r)
    return h, rid


def test_a_live_worker_is_not_lost_to_a_store_restart(r: redis.Redis) -> None:
    h, rid = outage(r)
    assert h.sweep()[0] == 0  # was 1: retired as lost, the run handed back, a failed attempt counted
    assert h.status(rid) == "running" and preempted(h, "s", rid) == []
    wait(h, LEASE // 3)
    assert h.heartbeat("w0") == []  # rejoins (offering its slots again) and renews its run's lease
    wait(h, LEASE // 3)
    assert h.sweep()[0] == 0
    assert h.heartbeat("w0") == []
    wait(h, LEASE // 3)
    assert h.sweep()[0] == 0
    h.complete(rid)
    assert h.status(rid) == "done" and preempted(h, "s", rid) == [] and not h.req(rid).get("fl")


def test_a_worker_still_silent_a_lease_after_the_restart_is_lost(r: redis.Redis) -> None:
    h, rid = outage(r)
    assert h.sweep()[0] == 0  # the grace starts: its lease is put off by one lease
    wait(h, LEASE // 2)
    assert h.sweep()[0] == 0 and h.status(rid) == "running"
    wait(h, LEASE // 2 + (100 if ON_CLUSTER else 0))
    assert h.sweep()[0] == 1
    assert preempted(h, "s", rid) == [("worker_lost", 2)]
    assert h.req(rid)["fl"] == "1"
