"""Never double-dispatched: two scheduler processes, several worker processes, sweeps hammered from
extra clients, hundreds of submissions gated by a group quota (so that the sweeps, not the submits,
do most of the dispatching) -> every request runs exactly once, its tokens exactly once."""

from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.connect import sync_client
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import Transitions, run_sync
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, spawn, stop_process, submit, wait_for

REQUESTS = 300
SESSIONS = 60
TOKENS = 5
WORKERS = 3
SLOTS = 4


@pytest.fixture
def cluster(redis_url: str, r: redis.Redis) -> Iterator[Stack]:
    """API in-process; two schedulers and three workers as real processes. A long lease keeps a
    busy machine's late heartbeat from looking like a dead worker (not what this test is about); and with
    no fair-share preemption (the test's three tenants: on a slow host a run outlives the minimum run and
    its tenant, above its share, was preempted) every start is a dispatch."""
    settings = fast_settings(redis_url, lease_seconds=6.0, slots=SLOTS, fair_share_preemption=False)
    api = Stack(settings).start(scheduler=False, workers=0)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs += [spawn("scheduler", settings) for _ in range(2)]
        procs += [spawn("worker", settings) for _ in range(WORKERS)]
        wait_for(lambda: r.hlen(keys.group_key("default", "workers")) == WORKERS
                 and r.llen(keys.group_key("default", "idle")) == WORKERS * SLOTS,
                 timeout=60, interval=0.1, what="the worker processes to register")
        wait_for(lambda: r.exists(keys.POLICY), timeout=30, what="a scheduler to start")
        yield api
        assert all(p.poll() is None for p in procs), "a component process died during the test"
    finally:
        for proc in procs:
            stop_process(proc)
        api.stop()


def hammer_sweeps(redis_url: str, lease_ms: int, stop: threading.Event, dispatched: list[int]) -> None:
    """Run the sweep script back to back from its own connection, racing the schedulers."""
    client = sync_client(redis_url, cluster=ON_CLUSTER)
    transitions = Transitions(Scripts(client, single_server=not ON_CLUSTER), lease_ms=lease_ms, session_ttl=3600)
    try:
        while not stop.is_set():
            dispatched.append(run_sync(transitions.sweep("default")).started)
    finally:
        client.close()


def test_every_request_dispatched_exactly_once(cluster: Stack, r: redis.Redis, redis_url: str) -> None:
    base = cluster.base_url
    code, reply = call("PUT", f"{base}/v1/admin/groups/default", {"requests_per_second": 120, "burst": 4})
    assert code == 200, reply

    stop = threading.Event()
    dispatched: list[list[int]] = [[], []]
    hammers = [threading.Thread(target=hammer_sweeps, args=(redis_url, 6000, stop, d), daemon=True)
               for d in dispatched]
    for thread in hammers:
        thread.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            plan = [(f"ms-{i % SESSIONS}", i) for i in range(REQUESTS)]
            # one priority (and no fair-share preemption, above): a preemption would be a legitimate second
            # start, and not what is tested here
            rids = list(pool.map(lambda job: (job[0], submit(base, job[0], max_tokens=TOKENS,
                                                            prompt=f"p{job[1]}", tenant=f"t{job[1] % 3}")), plan))

        def all_done() -> bool:
            with r.pipeline(transaction=False) as pipe:
                for _, rid in rids:
                    pipe.hget(keys.request(rid), "st")
                return all(st == "done" for st in pipe.execute())

        wait_for(all_done, timeout=90, interval=0.2, what=f"{REQUESTS} requests to finish")
    finally:
        stop.set()
        for thread in hammers:
            thread.join(10)

    # the quota really gated dispatch, and the racing sweeps really dispatched some of it
    assert r.hget(keys.group_key("default", "qs"), "throttled") == "requests_per_second"
    assert all(d for d in dispatched), "a hammering sweep never ran"
    assert sum(map(sum, dispatched)) > 0, "the extra sweeps never dispatched: they did not race anything"

    by_session: dict[str, list[str]] = {}
    for sid, rid in rids:
        by_session.setdefault(sid, []).append(rid)
    for sid, session_rids in by_session.items():
        log = [entry.split("|", 3) for entry in r.lrange(keys.session_log(sid), 0, -1)]
        for rid in session_rids:
            mine = [(name, json.loads(data)) for _, name, owner, data in log if owner == rid]
            names = Counter(name for name, _ in mine)
            assert names["started"] == 1 and names["resumed"] == 0 and names["preempted"] == 0, (rid, mine)
            assert names["done"] == 1 and names["queued"] == 1, (rid, names)
            assert [d["index"] for name, d in mine if name == "token"] == list(range(TOKENS)), rid
            fields = r.hmget(keys.request(rid), "a", "n", "st")
            assert fields == ["1", str(TOKENS), "done"], (rid, fields)
        # and the session's requests ran in submission order (starts follow submission)
        starts = [owner for _, name, owner, _ in log if name == "started"]
        assert starts == session_rids, sid

    # every ticket came home: each worker offers exactly its slots again, nothing runs, no lease left
    idle = keys.group_key("default", "idle")
    wait_for(lambda: r.llen(idle) == WORKERS * SLOTS, what="every slot back")
    assert set(Counter(r.lrange(idle, 0, -1)).values()) == {SLOTS}
    assert r.zcard(keys.group_key("default", "run")) == 0 and r.zcard(keys.group_key("default", "leases")) == 0
