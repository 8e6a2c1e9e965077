"""A cluster's control master refusing writes (full under noeviction: `maxmemory 1`) after the data step of
a submit or a cancel stored it (sessions/transitions.py): the call still succeeds, as for a lost
connection, since the repair pass finishes it; a 503 would make a client's retry store a second request.
And one refusing master does not stall the repair of the buckets after its own."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.embedded import EmbeddedCluster
from sluicegate.sessions import keys
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.transitions import run_sync
from tests.cluster_helpers import start_test_cluster
from tests.helpers import Stack, call, fast_settings, wait_for
from tests.sched_harness import Harness

pytestmark = pytest.mark.own_servers  # its own cluster


def master_of(rc: RedisCluster, key: str) -> int:
    return int(rc.get_node_from_key(key).port)


def master_client(cluster: EmbeddedCluster, port: int) -> redis.Redis:
    """A client on one master of the cluster."""
    return redis.Redis(host="127.0.0.1", port=port, password=cluster.password)


@contextlib.contextmanager
def refusing(cluster: EmbeddedCluster, port: int) -> Iterator[Callable[[bool], None]]:
    """`refuse(True)` makes one master refuse writes (`maxmemory 1`), `refuse(False)` makes it take them
    again, as it does on the way out, whatever happened."""
    node = master_client(cluster, port)

    def refuse(on: bool) -> None:
        node.config_set("maxmemory", "1" if on else "0")

    try:
        yield refuse
    finally:
        refuse(False)
        node.close()


def session_on_another_master(rc: RedisCluster, port: int, prefix: str = "s") -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if master_of(rc, keys.session_prefix(f"{prefix}{i}")) != port)


def queued_events(rc: RedisCluster, sid: str) -> list[str]:
    return [raw.split("|", 3)[2] for raw in rc.lrange(keys.session_log(sid), 0, -1) if raw.split("|", 3)[1] == "queued"]


def test_a_submit_whose_control_master_refuses_is_accepted_and_runs_once(
        rc: RedisCluster, valkey_cluster: EmbeddedCluster) -> None:
    stack = Stack(fast_settings(valkey_cluster.url, redis_cluster=True)).start(workers=1)
    ctl_port = master_of(rc, keys.group_prefix("default"))
    try:
        with refusing(valkey_cluster, ctl_port) as refuse:
            code, _ = call("POST", f"{stack.base_url}/v1/sessions/warm/requests", {"prompt": "x", "max_tokens": 2})
            assert code == 202  # the group and its worker exist before the master refuses
            sid = session_on_another_master(rc, ctl_port)
            refuse(True)
            code, body = call("POST", f"{stack.base_url}/v1/sessions/{sid}/requests",
                              {"prompt": "hello", "max_tokens": 3})
            assert code == 202, (code, body)  # the old code answered 503 "retry shortly" for a stored request
            rid = body["request_id"]
            assert rc.hget(keys.request(rid), "st") == "queued"
            refuse(False)
            wait_for(lambda: rc.hget(keys.request(rid), "st") == "done", timeout=20, what="the repaired request done")
            assert queued_events(rc, sid) == [rid], "exactly one request stored"
    finally:
        stack.stop()


def test_a_cancel_whose_control_master_refuses_reports_cancelled(
        rc: RedisCluster, valkey_cluster: EmbeddedCluster) -> None:
    h = Harness(rc, lease_ms=60_000, cluster=True)
    h._group("default")  # no worker: the request stays queued
    ctl_port = master_of(rc, keys.group_prefix("default"))
    sid = session_on_another_master(rc, ctl_port)
    rid = h.submit(sid, max_tokens=2)
    with refusing(valkey_cluster, ctl_port) as refuse:
        refuse(True)
        assert run_sync(h.t.cancel(rid)) == ["cancelled"]  # the old code raised OutOfMemoryError (503)
        assert h.status(rid) == "cancelled"


def a_group_on_each_master(rc: RedisCluster) -> dict[int, str]:
    """Master port -> the name of a group whose control plane it holds."""
    groups: dict[int, str] = {}
    for i in range(1000):
        groups.setdefault(master_of(rc, keys.group_prefix(f"g{i}")), f"g{i}")
    return groups


def test_a_repair_pass_with_a_refusing_master_still_repairs_the_buckets_after_it(
        rc: RedisCluster, valkey_cluster: EmbeddedCluster) -> None:
    h = Harness(rc, lease_ms=60_000, cluster=True)
    (bad_port, bad_group), (_, good_group) = list(a_group_on_each_master(rc).items())[:2]
    h.add_worker("wbad", group=bad_group, slots=1)
    h.add_worker("wgood", group=good_group, slots=1)
    buckets = keys.all_buckets()
    order = buckets.index

    def sid_where(prefix: str, ok: Callable[[str], bool]) -> str:
        return next(f"{prefix}{i}" for i in range(100_000) if ok(f"{prefix}{i}"))

    def off_bad(sid: str) -> bool:
        return master_of(rc, keys.session_prefix(sid)) != bad_port

    # Heads a dead caller left in the outboxes (only the data step ran): the refusing group's in an early
    # bucket, the healthy group's in a later one.
    bad_sid = sid_where("b", lambda s: off_bad(s) and order(keys.bucket_of_session(s)) < len(buckets) // 2)
    good_sid = sid_where("g", lambda s: off_bad(s) and order(keys.bucket_of_session(s)) > order(
        keys.bucket_of_session(bad_sid)))
    rids = {}
    for sid, group in ((bad_sid, bad_group), (good_sid, good_group)):
        req = NewRequest(session_id=sid, max_tokens=2, priority=5, tenant="t", group=group, prompt="p")
        reply = h.scripts.call("submit", [keys.session_prefix(sid)],
                               [req.request_id, sid, "t", group, 5, 2, "p", "p", "{}", 1, ""])
        assert reply[0] == "ok"
        rids[group] = req.request_id
    with refusing(valkey_cluster, bad_port) as refuse:
        refuse(True)
        assert run_sync(h.t.repair(buckets, age_ms=0)) == 1  # the old code raised OutOfMemoryError here
        h.collect()
        assert h.status(rids[good_group]) == "running"
        assert h.status(rids[bad_group]) == "queued"
        outbox = rc.zrange(keys.outbox(keys.bucket_of_session(bad_sid)), 0, -1)
        assert rids[bad_group] in outbox, "the refused head stays for the next pass"
        refuse(False)
        assert run_sync(h.t.repair(buckets, age_ms=0)) == 1
        h.collect()
        assert h.status(rids[bad_group]) == "running"


def test_a_sweep_whose_data_master_refuses_one_lost_run_still_ends_the_others(
        rc: RedisCluster, valkey_cluster: EmbeddedCluster) -> None:
    """The sweep's lost runs and missed `fail` deadlines are each ended on their own data master: the one
    on a master that refuses (down, full) is left for the next sweep, the others are not held back (the
    old code stopped at the first: lost runs stayed running, a missed deadline was dropped from `dld`)."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    ctl_port = master_of(rc, keys.group_prefix("default"))
    bad_port = next(p for p in (n.port for n in rc.get_primaries()) if int(p) != ctl_port)

    def sid_on(prefix: str, bad: bool) -> str:
        return next(f"{prefix}{i}" for i in range(10_000)
                    if (master_of(rc, keys.session_prefix(f"{prefix}{i}")) == int(bad_port)) == bad)

    h.add_worker("w1", slots=2)
    lost_bad, lost_good = h.submit(sid_on("a", True)), h.submit(sid_on("b", False))
    late = h.submit(sid_on("c", False), deadline_ms=1, fail_on_miss=True)  # waits: both slots are taken
    leases = keys.group_key("default", "leases")
    rc.zadd(leases, {f"{lost_bad}|1": 0, f"{lost_good}|1": 1})  # lapsed, the refused one first
    time.sleep(0.05)  # the late one's deadline passes
    with refusing(valkey_cluster, int(bad_port)) as refuse:
        refuse(True)
        run_sync(h.t.sweep("default"))
        assert h.status(lost_good) == "preempted" and h.status(late) == "failed"
        assert h.status(lost_bad) == "running" and rc.zscore(leases, f"{lost_bad}|1") is not None  # retried later
        refuse(False)
        rc.zadd(leases, {f"{lost_bad}|1": 0})  # pushed back a second by the failed hand-back: now due again
        run_sync(h.t.sweep("default"))
        assert h.status(lost_bad) == "preempted"


def test_lost_runs_of_a_refusing_master_do_not_fill_every_sweeps_batch(
        rc: RedisCluster, valkey_cluster: EmbeddedCluster) -> None:
    """A sweep reads at most 200 lapsed leases, oldest first: 201 lost runs on a refusing master, older than
    one on a healthy master, filled every batch for as long as the master refused (the old code left their
    leases as they were), and the healthy master's run was never handed back."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    ctl_port = master_of(rc, keys.group_prefix("default"))
    bad_port = next(int(n.port) for n in rc.get_primaries() if int(n.port) != ctl_port)
    on_bad = (f"a{i}" for i in range(100_000) if master_of(rc, keys.session_prefix(f"a{i}")) == bad_port)
    h.add_worker("w1", slots=202)
    stuck = [h.submit(next(on_bad)) for _ in range(201)]
    healthy = h.submit(next(f"b{i}" for i in range(10_000) if master_of(rc, keys.session_prefix(f"b{i}")) != bad_port))
    leases = keys.group_key("default", "leases")
    rc.zadd(leases, {**{f"{rid}|1": 0 for rid in stuck}, f"{healthy}|1": 1})  # lapsed, the refused ones first
    with refusing(valkey_cluster, bad_port) as refuse:
        refuse(True)
        run_sync(h.t.sweep("default"))  # 200 refused: pushed back
        run_sync(h.t.sweep("default"))
        assert h.status(healthy) == "preempted", "the healthy master's lost run was never reached"
        assert h.status(stuck[0]) == "running"  # left for a later sweep


def test_a_busy_master_does_not_stop_the_repair_of_the_others_buckets(
        rc: RedisCluster, valkey_cluster: EmbeddedCluster) -> None:
    """A master running a long script answers BUSY (LOADING after a restart is the same): the repair pass's
    count of every bucket's outbox failed as a whole in the old code, so no bucket was repaired."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    h._group("default")
    ctl_port = master_of(rc, keys.group_prefix("default"))
    busy_port = next(int(n.port) for n in rc.get_primaries() if int(n.port) != ctl_port)
    sid = session_on_another_master(rc, busy_port)
    req = NewRequest(session_id=sid, max_tokens=2, priority=5, tenant="t", group="default", prompt="p")
    reply = h.scripts.call("submit", [keys.session_prefix(sid)],  # the data step only: its caller died
                           [req.request_id, sid, "t", "default", 5, 2, "p", "p", "{}", 1, ""])
    assert reply[0] == "ok" and not rc.hkeys(keys.group_key("default", "rq"))
    node = master_client(valkey_cluster, busy_port)
    script = "local t = redis.call('TIME')[1] while tonumber(redis.call('TIME')[1]) < t + 2 do end return 1"
    busy = threading.Thread(target=lambda: master_client(valkey_cluster, busy_port).eval(script, 0), daemon=True)
    try:
        node.config_set("busy-reply-threshold", 100)
        busy.start()
        time.sleep(0.3)  # the script runs: the master answers BUSY
        assert run_sync(h.t.repair(keys.all_buckets(), age_ms=0)) == 1
        assert rc.hkeys(keys.group_key("default", "rq")) == [sid]
    finally:
        busy.join()
        node.config_set("busy-reply-threshold", 5000)
        node.close()


def test_an_unreachable_master_does_not_stop_the_repair_of_the_others_buckets(tmp_path: Path) -> None:
    """A master down (before the cluster fails it over): the pipelined count of every outbox cannot reach
    it, so the pass asks each bucket on its own, and the heads on the masters that answer are readied."""
    cluster = start_test_cluster(tmp_path)
    rc = RedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        h = Harness(rc, lease_ms=60_000, cluster=True)
        h._group("default")
        ctl_port = master_of(rc, keys.group_prefix("default"))
        down = next(i for i, n in enumerate(sorted(int(n.port) for n in rc.get_primaries())) if
                    cluster.port + i != ctl_port)
        down_port = cluster.port + down
        sid = session_on_another_master(rc, down_port)
        req = NewRequest(session_id=sid, max_tokens=2, priority=5, tenant="t", group="default", prompt="p")
        assert h.scripts.call("submit", [keys.session_prefix(sid)],  # the data step only: its caller died
                              [req.request_id, sid, "t", "default", 5, 2, "p", "p", "{}", 1, ""])[0] == "ok"
        cluster.kill_node(down)
        assert run_sync(h.t.repair(keys.all_buckets(), age_ms=0)) == 1
        assert rc.hkeys(keys.group_key("default", "rq")) == [sid]
    finally:
        rc.close()
        cluster.kill()
