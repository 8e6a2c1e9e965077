"""The repair pass and the outbox on a cluster (a review's findings):

- a session used again after its idle TTL starts its event ids again at 1, so its new life's first head has
  a smaller `fs` than a ready entry its old life left on the control plane (a cancel whose control step was
  lost): `ready` answered it 'stale' (the submit's own ready and the repair pass's alike), the pass dropped
  it from the outbox, and it stayed queued for ever, its session blocked behind it;
- a group whose control master refuses, with a batch's worth (100) of heads in a bucket's outbox, filled
  every pass's batch of that bucket: the heads of other groups behind them were never readied.

The cluster protocol (one call per plane), on one server and in the cluster pass; the refusing master
needs a cluster of its own in the single-server pass (as tests/test_cluster_refusals.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.embedded import EmbeddedCluster
from sluicegate.sessions import keys
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.transitions import Transitions, run_sync
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness
from tests.test_cluster_refusals import a_group_on_each_master, master_of, refusing


def data_step_only(h: Harness, sid: str, group: str = "default") -> str:
    """A submit whose caller died after the data step: its head is in the outbox, unknown to the control plane."""
    h._group(group)
    rid = keys.bucket_of_session(sid) + f"d{time.monotonic_ns()}"
    req = NewRequest(session_id=sid, max_tokens=2, priority=5, tenant="t", group=group, prompt="p", request_id=rid)
    reply = h.scripts.call("submit", [keys.session_prefix(sid)],
                           [req.request_id, sid, "t", group, 5, 2, "p", "p", "{}", 1, ""])
    assert reply[0] == "ok"
    return rid


def old_life_with_a_stale_entry(h: Harness, r: redis.Redis, sid: str) -> str:
    """A session whose last head was cancelled with its control step lost (its ready entry stays), then left
    idle past its TTL: its meta, log and requests expire. Returns the stale entry's request id."""
    h._group("default")  # no worker (the model's workers are down): the heads wait
    h1 = h.submit(sid, max_tokens=2)
    h2 = h.submit(sid, max_tokens=2)
    h.cancel(h1)  # both steps: h2 is the session's ready head
    assert h.waiting_rid(sid) == h2
    assert h.scripts.call("cancel", [keys.request_prefix(h2)], [3600, h2, ""])[0] == "cancelled"  # data step only
    assert h.waiting_rid(sid) == h2 and int(r.hget(keys.request(h2), "fs")) > 1
    for key in (keys.session_meta(sid), keys.session_log(sid), keys.request(h1), keys.request(h2),
                keys.request_input(h1), keys.request_input(h2)):
        r.delete(key)  # what the idle TTL does
    return h2


def test_a_used_again_session_s_first_head_replaces_its_old_life_s_stale_entry(r: redis.Redis) -> None:
    h = Harness(r, lease_ms=60_000, cluster=True)
    stale = old_life_with_a_stale_entry(h, r, "again")
    h3 = h.submit("again", max_tokens=2)  # a new life: its ids start again at 1
    assert r.hget(keys.request(h3), "fs") == "1"
    assert h.waiting_rid("again") == h3  # [h2's id: the submit's own ready was answered 'stale']
    h.add_worker("w1", slots=2)  # the workers come back
    assert h.dispatched_rids() == [h3]  # the old entry is gone, never dispatched
    h.complete(h3)
    assert h.status(h3) == "done"
    h4 = h.submit("again", max_tokens=2)  # the session goes on
    h.complete(h4)
    assert h.status(h4) == "done" and stale not in h.dispatched_rids() and h.dispatched_rids().count(h3) == 1


def test_the_repair_pass_readies_a_used_again_session_s_head_over_its_old_life_s_stale_entry(
        r: redis.Redis) -> None:
    h = Harness(r, lease_ms=60_000, cluster=True)
    old_life_with_a_stale_entry(h, r, "again")
    h3 = data_step_only(h, "again")  # its caller died too: only the repair pass readies it
    box = keys.outbox(keys.bucket_of_session("again"))
    assert r.zscore(box, h3) is not None
    assert run_sync(h.t.repair(keys.all_buckets(), age_ms=0)) == 1  # [0: answered 'stale' and dropped]
    assert h.waiting_rid("again") == h3 and r.zscore(box, h3) is None
    h.add_worker("w1", slots=2)
    assert h.dispatched_rids() == [h3]
    h.complete(h3)
    assert h.status(h3) == "done"


def test_a_late_ready_of_an_earlier_head_of_the_same_life_is_still_stale_and_cleared(
        r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repair pass reads a head from the outbox; before its ready lands the head is cancelled and the
    session's next one is readied: the late ready is answered 'stale', leaves the outbox, and readies nothing."""
    h = Harness(r, lease_ms=60_000, cluster=True)
    h.add_worker("w0", slots=1)
    busy = h.submit("busy", max_tokens=2)  # holds the only slot
    first = h.submit("s", max_tokens=2)  # waits: ready, and in the outbox
    second = h.submit("s", max_tokens=2)  # behind it
    box = keys.outbox(keys.bucket_of_session("s"))
    assert h.waiting_rid("s") == first and r.zscore(box, first) is not None
    ready = Transitions._ready
    outcomes: list[str] = []

    async def late_ready(self: Transitions, spec_json: object) -> str:
        if not outcomes:
            outcomes.append("cancelled first")
            h.cancel(first)  # both steps: `second` is the head now, and ready
        outcome = await ready(self, spec_json)
        outcomes.append(outcome)
        return outcome

    monkeypatch.setattr(Transitions, "_ready", late_ready)
    assert run_sync(h.t.repair([keys.bucket_of_session("s")], age_ms=0)) == 0
    monkeypatch.setattr(Transitions, "_ready", ready)
    assert outcomes == ["cancelled first", "ready", "stale"]  # the cancel's ready of `second`, then the pass's
    assert h.waiting_rid("s") == second and r.zscore(box, first) is None
    h.complete(busy)
    h.complete(second)
    assert h.status(second) == "done" and h.status(first) == "cancelled"
    assert first not in h.dispatched_rids() and h.dispatched_rids().count(second) == 1


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[RedisCluster, EmbeddedCluster]]:
    """A client and its cluster: the suite's in the cluster pass, the test cluster of its own in the other."""
    if ON_CLUSTER:
        yield request.getfixturevalue("r"), request.getfixturevalue("valkey_server")
    else:
        yield request.getfixturevalue("rc"), request.getfixturevalue("valkey_cluster")


def test_a_refusing_group_s_heads_do_not_fill_every_repair_batch_of_their_bucket(
        cluster: tuple[RedisCluster, EmbeddedCluster], caplog: pytest.LogCaptureFixture) -> None:
    """A bucket's outbox holds 100 heads (the pass's batch) of a group whose control master refuses, older
    than a head of a healthy group: the refused ones go to the back, and the next pass readies the healthy
    one. The refusing master is asked once a pass, not once for each of its heads."""
    rc, valkey_cluster = cluster
    h = Harness(rc, lease_ms=60_000, cluster=True)
    (bad_port, bad_group), (good_port, good_group) = list(a_group_on_each_master(rc).items())[:2]
    h.add_worker("wgood", group=good_group, slots=1)
    third = next(p for p in (int(n.port) for n in rc.get_primaries()) if p not in (bad_port, good_port))
    bucket = next(b for b in keys.all_buckets() if master_of(rc, keys.outbox(b)) == third)
    sids = (f"s{i}" for i in range(10_000_000) if keys.bucket_of_session(f"s{i}") == bucket)
    bad = [data_step_only(h, next(sids), bad_group) for _ in range(100)]  # their callers' readies refused
    time.sleep(0.01)
    good = data_step_only(h, next(sids), good_group)  # a caller that died after the data step
    box = keys.outbox(bucket)
    caplog.set_level(logging.WARNING, logger="sluicegate.sessions.transitions")
    with refusing(valkey_cluster, bad_port) as refuse:
        refuse(True)
        assert run_sync(h.t.repair(keys.all_buckets(), age_ms=0)) == 0  # the batch: the 100 refused
        time.sleep(0.01)
        assert run_sync(h.t.repair(keys.all_buckets(), age_ms=0)) == 1
        h.collect()
        assert h.status(good) == "running"  # [queued, and the outbox 101 long, after any number of passes]
        refused = [rec for rec in caplog.records if "readying" in rec.getMessage()]
        assert len(refused) == 2, [rec.getMessage() for rec in refused]  # [100 in the first pass]
        assert sorted(rc.zrange(box, 0, -1)) == sorted(bad)  # every refused head kept
        assert all(h.status(rid) == "queued" for rid in bad)
        refuse(False)
        time.sleep(0.01)
        assert run_sync(h.t.repair(keys.all_buckets(), age_ms=0)) == 100
        assert rc.zcard(box) == 0
        assert {h.waiting_rid(rc.hget(keys.request(rid), "sid"), bad_group) for rid in bad} == set(bad)
