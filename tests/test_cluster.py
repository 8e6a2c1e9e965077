"""The scheduling protocol on a real 3-master Valkey Cluster: each transition as one call per plane,
in its plane's slot (sessions/transitions.py), driven by the test playing the workers (the harness),
on the servers' own clock. Proves: session order and exactly-once token indices across preemption and
a lost worker; a caller that dies between the two steps of a submit or a finish loses nothing (the
repair pass and the sweep finish the job); the data of many sessions spreads over the masters."""

from __future__ import annotations

import json
import time

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.embedded import EmbeddedCluster
from sluicegate.sessions import keys
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.transitions import run_sync
from tests.metrics_helpers import raw_depths
from tests.sched_harness import Harness, Run

pytestmark = pytest.mark.own_servers  # its own cluster

LEASE = 600


def log(r: RedisCluster, sid: str) -> list[tuple[str, str, dict]]:
    out = []
    for raw in r.lrange(keys.session_log(sid), 0, -1):
        _, event, rid, data = raw.split("|", 3)
        out.append((event, rid, json.loads(data)))
    return out


def test_a_session_runs_in_order_with_every_index_once_across_preemption(rc: RedisCluster) -> None:
    h = Harness(rc, lease_ms=60_000, cluster=True)
    h.policy(min_run=0)
    h.add_worker("w0", slots=1)
    first = h.submit("a", priority=2, max_tokens=6)
    second = h.submit("a", priority=2, max_tokens=3)
    h.append(h.run_of(first), 2)
    high = h.submit("h", priority=8, tenant="u", max_tokens=2)
    # The control plane preempted `first`, handed its slot to `high` and told its worker; the worker's
    # hand-back fences it.
    assert h.status(first) == "running" and h.status(high) == "running" and h.run_of(high).wid == "w0"
    assert rc.zcard(keys.group_key("default", "pre")) == 0
    h.handback(h.run_of(first), reason="priority")
    assert h.status(first) == "preempted" and h.status(high) == "running"
    h.complete(high)
    assert h.run_of(first).next_index == 2 and h.run_of(first).attempt == "2"
    h.complete(first)
    h.complete(second)
    events = log(rc, "a")
    assert [d["index"] for e, rid, d in events if e == "token" and rid == first] == list(range(6))
    assert [(e, d.get("reason")) for e, rid, d in events if rid == first and e in ("preempted", "resumed")] == [
        ("preempted", "priority"), ("resumed", None)]
    order = [(e, rid) for e, rid, _ in events if e in ("started", "done")]
    assert order == [("started", first), ("done", first), ("started", second), ("done", second)]


def test_a_submit_whose_caller_died_after_the_data_step_is_readied_by_the_repair_pass(rc: RedisCluster) -> None:
    h = Harness(rc, lease_ms=LEASE, cluster=True)
    h.add_worker("w0", slots=1)
    h._group("default")
    req = NewRequest(session_id="orphan", max_tokens=2, priority=5, tenant="t", group="default", prompt="p")
    # Only the data step: the request is stored and its head noted in the bucket's outbox.
    reply = h.scripts.call("submit", [keys.session_prefix("orphan")],
                           [req.request_id, "orphan", "t", "default", 5, 2, "p", "p", "{}", 1, ""])
    assert reply[0] == "ok" and h.status(req.request_id) == "queued"
    assert rc.zscore(keys.outbox(keys.bucket_of_session("orphan")), req.request_id) is not None
    assert not h.collect(), "nothing dispatched: the control step never ran"
    bucket = [keys.bucket_of_session("orphan")]
    assert run_sync(h.t.repair(bucket, age_ms=0)) == 1
    h.collect()
    assert h.status(req.request_id) == "running"
    assert rc.zcard(keys.outbox(bucket[0])) == 0
    assert run_sync(h.t.repair(bucket, age_ms=0)) == 0, "repeating the repair changes nothing"
    h.complete(req.request_id)
    assert h.status(req.request_id) == "done"


def test_a_finish_whose_caller_died_after_the_data_step_is_completed(rc: RedisCluster) -> None:
    """The worker ended the run on the data plane and died: the sweep closes its run (lease lapsed),
    the repair pass readies the session's next request, nothing runs twice."""
    h = Harness(rc, lease_ms=LEASE, cluster=True)
    h.add_worker("w0", slots=1)
    h.add_worker("w1", slots=1)
    first = h.submit("s", max_tokens=2)
    second = h.submit("s", max_tokens=2)
    run = h.run_of(first)
    h.append(run, 2)
    reply = h.scripts.call("finish", [keys.request_prefix(first)], [3600, first, run.attempt, run.wid, "done", "stop"])
    assert int(reply[0]) == 1 and h.status(first) == "done"
    h.runs.remove(run)  # the worker is gone: no release, no next-ready
    assert h.status(second) == "queued"
    time.sleep(LEASE / 1000 + 0.2)
    h.sweep()  # the lapsed lease: the run is closed on the control plane
    assert not rc.zcard(keys.group_key("default", "run"))
    assert run_sync(h.t.repair([keys.bucket_of_session("s")], age_ms=0)) == 1
    h.collect()
    assert h.status(second) == "running"
    h.complete(second)
    events = log(rc, "s")
    assert [e for e, rid, _ in events if rid == first].count("done") == 1
    assert [e for e, _, _ in events].count("started") == 2


def test_a_lost_worker_s_run_resumes_elsewhere_at_the_next_index(rc: RedisCluster) -> None:
    h = Harness(rc, lease_ms=LEASE, cluster=True)
    h.add_worker("w0", slots=1)
    rid = h.submit("k", max_tokens=5)
    run = h.run_of(rid)
    h.append(run, 3)
    h.runs.remove(run)  # killed
    del h.workers[run.wid]
    h.add_worker("w1", slots=1)
    time.sleep(LEASE / 1000 + 0.2)
    h.sweep()
    resumed = h.run_of(rid)
    assert (resumed.wid, resumed.attempt, resumed.next_index) == ("w1", "2", 3)
    h.complete(rid)
    events = log(rc, "k")
    assert [d["index"] for e, _, d in events if e == "token"] == list(range(5))
    assert [(e, d.get("reason")) for e, _, d in events if e == "preempted"] == [("preempted", "worker_lost")]


def test_sessions_spread_over_the_masters(rc: RedisCluster, valkey_cluster: EmbeddedCluster) -> None:
    h = Harness(rc, lease_ms=60_000, cluster=True)
    for i in range(600):
        h.submit(f"spread-{i}", max_tokens=1)
    counts = []
    for url in valkey_cluster.urls:
        node = redis.Redis.from_url(url)
        counts.append(sum(1 for _ in node.scan_iter(match="sg:{s:*", count=1000)))
        node.close()
    total = sum(counts)
    assert all(0.15 <= c / total <= 0.45 for c in counts), counts


def test_a_dispatch_whose_worker_died_before_starting_it_is_dispatched_again(rc: RedisCluster) -> None:
    """Control step done (run record, lease, inbox), data step (`start`) never ran: the lease lapses,
    the sweep requeues it, another worker starts it; the client sees one `started`."""
    h = Harness(rc, lease_ms=LEASE, cluster=True)
    h._group("default")
    # w0 offers a slot but is not played by the harness: it takes no assignment and dies before `start`
    run_sync(h.t.register_worker("default", "w0", free=1, total=1))
    rid = h.submit("d", max_tokens=3)
    assert rc.llen(keys.worker_inbox("default", "w0")) == 1 and h.status(rid) == "queued"
    h.add_worker("w1", slots=1)
    time.sleep(LEASE / 1000 + 0.2)
    h.sweep()
    run = h.run_of(rid)
    assert (run.wid, run.attempt) == ("w1", "2")
    h.complete(rid)
    events = log(rc, "d")
    assert [e for e, _, _ in events].count("started") == 1 and "preempted" not in [e for e, _, _ in events]
    assert [d["index"] for e, _, d in events if e == "token"] == [0, 1, 2]


def test_a_preemption_whose_worker_died_before_handing_back_is_fenced_by_the_sweep(rc: RedisCluster) -> None:
    """Control step done (the run stopped and requeued, the notice sent), the worker died before its
    hand-back (the data step): the sweep fences it on the data plane; it resumes where it was."""
    h = Harness(rc, lease_ms=LEASE, cluster=True)
    h.policy(min_run=0)
    h.add_worker("w0", slots=1)
    low = h.submit("low", priority=1, max_tokens=6)
    h.append(h.run_of(low), 2)
    high = h.submit("high", priority=8, max_tokens=1)  # takes low's slot on w0 at once
    assert h.status(low) == "running" and h.run_of(high).wid == "w0"
    h.runs = [run for run in h.runs if run.wid != "w0"]  # died: no hand-back, and high's run lost with it
    del h.workers["w0"]
    time.sleep(LEASE / 1000 + 0.2)
    h.sweep()  # the leases lapsed: low fenced as it was stopped, high requeued (its worker lost)
    assert h.status(low) == "preempted"
    h.add_worker("w1", slots=1)  # high first (class 8), then low
    h.complete(high)
    resumed = h.run_of(low)
    assert (resumed.wid, resumed.next_index) == ("w1", 2)
    h.complete(low)
    events = log(rc, "low")
    assert [d["index"] for e, _, d in events if e == "token"] == list(range(6))
    assert [e for e, _, _ in events].count("started") == 1 and [e for e, _, _ in events].count("done") == 1


def test_a_cancel_whose_caller_died_before_the_control_step_frees_everything(rc: RedisCluster) -> None:
    """Data step done (`cancelled`), control step (withdraw) never ran: a waiting request is refused
    at its start and its slot comes back; a running one is fenced at its next write."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    h.add_worker("w0", slots=1)
    running = h.submit("a", max_tokens=4)
    waiting = h.submit("b", max_tokens=4)
    for rid in (running, waiting):
        reply = h.scripts.call("cancel", [keys.request_prefix(rid)], [3600, rid, ""])
        assert reply[0] == "cancelled"
    assert h.append(h.run_of(running), 1)[0] == 0  # fenced
    h.handback(h.run_of(running), reason="released")  # the worker lets go: its slot goes to `waiting`...
    assert h.status(waiting) == "cancelled" and not h.runs  # ...whose start is refused: the slot comes back
    assert rc.lrange(keys.group_key("default", "idle"), 0, -1) == ["w0"]
    after = h.submit("c", max_tokens=1)
    h.complete(after)
    for sid in ("a", "b"):
        names = [e for e, _, _ in log(rc, sid)]
        assert names.count("cancelled") == 1 and "done" not in names
    assert "started" not in [e for e, _, _ in log(rc, "b")]


def test_a_finish_refused_after_the_sweep_handed_the_run_back_still_requeues_it(rc: RedisCluster) -> None:
    """The worker's finish lands between the sweep's hand-back and its release: the worker's release
    (first to find the run record) requeues the request, the sweep's finds nothing. Nothing is stuck."""
    h = Harness(rc, lease_ms=LEASE, cluster=True)
    h.add_worker("w0", slots=1)
    rid = h.submit("late", max_tokens=3)
    run = h.run_of(rid)
    h.append(run, 3)
    time.sleep(LEASE / 1000 + 0.2)
    cp, key = keys.group_prefix("default"), f"{rid}|{run.attempt}"
    assert h.scripts.call("sweep", [cp], [LEASE])[5:] == [1, f"worker_lost:{key}"]  # the sweep's control step
    stopped = h.scripts.call("handback", [keys.request_prefix(rid)], [rid, run.attempt, "", "worker_lost"])
    h.runs.remove(run)
    assert not run_sync(h.t.finish(rid, run.attempt, wid="w0", group="default", outcome="done", detail="stop",
                                   return_slot=True))  # refused: the run was taken away
    h.scripts.call("release", [cp], [LEASE, key, "", stopped[2], stopped[3], "keep"])  # the sweep's release
    h.add_worker("w1", slots=1)
    assert h.run_of(rid).next_index == 3
    h.complete(rid)
    events = log(rc, "late")
    assert [d["index"] for e, _, d in events if e == "token"] == [0, 1, 2]
    assert [e for e, _, _ in events][-1] == "done"


def test_a_paused_worker_keeps_the_slot_of_a_run_the_sweep_closed(rc: RedisCluster) -> None:
    """The sweep closes the run of a paused worker; the worker rejoins counting that run as held and
    gets its ticket back when it lets go of it: no slot is lost."""
    h = Harness(rc, lease_ms=LEASE, cluster=True)
    h.add_worker("w0", slots=1)
    rid = h.submit("paused", max_tokens=3)
    time.sleep(LEASE / 1000 + 0.2)
    h.sweep()  # retires w0, hands the run back (worker_lost), releases it keeping w0's slot
    assert h.heartbeat("w0") == [f"{rid}|1"]  # rejoins (offering its other 0 slots); the run is lost
    h.handback(h.run_of(rid), reason="released")  # lets go: the ticket comes back and takes the run
    resumed = h.run_of(rid)
    assert (resumed.wid, resumed.attempt) == ("w0", "2")
    h.complete(rid)
    assert rc.lrange(keys.group_key("default", "idle"), 0, -1) == ["w0"]


def test_a_late_ready_of_an_earlier_head_never_replaces_the_session_s_later_one(rc: RedisCluster) -> None:
    h = Harness(rc, lease_ms=60_000, cluster=True)
    h.add_worker("w0", slots=1)
    busy = h.submit("busy", max_tokens=2)  # holds the only slot
    first = NewRequest(session_id="s", max_tokens=2, priority=5, tenant="t", group="default", prompt="p")
    reply = h.scripts.call("submit", [keys.session_prefix("s")],
                           [first.request_id, "s", "t", "default", 5, 2, "p", "p", "{}", 1, ""])
    early_spec = reply[2]
    assert h.scripts.call("ready", [keys.group_prefix("default")], [60_000, early_spec]) == "ready"
    later = h.submit("s", max_tokens=2)
    h.cancel(first.request_id)  # `later` becomes the head and waits for the slot
    assert h.waiting_rid("s") == later
    # the ready step of `first`, delayed (a stalled caller, a slow repair pass), arrives now
    assert h.scripts.call("ready", [keys.group_prefix("default")], [60_000, early_spec]) == "stale"
    assert h.waiting_rid("s") == later
    h.complete(busy)
    h.complete(later)
    assert h.status(later) == "done"


def test_a_repair_after_an_attempt_closed_before_it_started_leaves_the_next_attempt_alone(rc: RedisCluster) -> None:
    """The sweep closes attempt 1 before it started (the data plane notes it as `fa`, its `a` stays 0) and
    dispatches attempt 2. The repair pass, finding the submit's outbox entry still there (only a start
    clears it), readies the head again: it must see attempt 2 in flight, not put the request back in the
    ready set to be dispatched a third time (a start that is refused, with its tenant charged the run's
    estimate and the queue depth counted out twice)."""
    h = Harness(rc, lease_ms=LEASE, cluster=True)
    h._group("default")
    run_sync(h.t.register_worker("default", "w0", free=1, total=1))  # takes attempt 1 and never starts it
    rid = h.submit("d", max_tokens=3)
    time.sleep(LEASE / 1000 + 0.2)
    h.sweep()  # attempt 1 closed before it started; no free slot for the next
    rc.delete(keys.worker_inbox("default", "w0"))
    h.add_worker("w1", slots=1, collect=False)  # attempt 2 waits in w1's inbox
    assert rc.hget(keys.request(rid), "fa") == "1" and rc.hexists(keys.group_key("default", "ri"), f"{rid}|2")
    assert rc.hget(keys.request(rid), "st") == "queued"
    charged = h.vtc("t")
    # read and readied again, but only confirmed ("known": attempt 2 in flight): nothing half-done completed
    assert run_sync(h.t.repair([keys.bucket_of_session("d")], age_ms=0)) == 0
    assert rc.zscore(keys.outbox(keys.bucket_of_session("d")), rid) is None
    assert h.waiting_rid("d") is None and h.vtc("t") == charged
    h.collect()
    h.complete(rid)
    h.add_worker("w2", slots=1)  # a free slot: nothing is left to dispatch
    assert [(run.wid, run.attempt) for run in h.dispatched if run.rid == rid][-1:] == [("w1", "2")]
    assert h.dispatched_rids().count(rid) == 1 and h.status(rid) == "done"
    assert all(v == 0 for v in raw_depths(rc, ["default"]).values())


def test_a_cancel_between_a_dispatch_and_its_start_counts_the_request_out_of_the_depth_once(rc: RedisCluster) -> None:
    """Dispatched (its assignment waits in the worker's inbox), not yet started on the data plane: the
    status says queued, the control plane has it running. A cancel then must take it off the queue
    depth once, not once on each plane."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    h.add_worker("w0", slots=1, collect=False)
    rid = keys.bucket_of_session("a") + "r1"
    new = NewRequest(session_id="a", max_tokens=4, priority=5, tenant="t", group="default", prompt="p", request_id=rid)
    assert run_sync(h.t.submit(new))[0] == "ok"  # dispatched: the harness's worker has not taken it yet
    assert rc.hexists(keys.group_key("default", "ri"), f"{rid}|1") and h.status(rid) == "queued"
    assert h.cancel(rid)[0] == "cancelled"  # the worker's start is then refused, and it lets go
    assert h.status(rid) == "cancelled"
    assert all(v == 0 for v in raw_depths(rc, ["default"]).values())


def test_a_cancel_between_a_preemption_and_its_hand_back_leaves_the_depth_exact(rc: RedisCluster) -> None:
    """The control plane preempted a run and put it back to wait; the data plane has it running until
    the worker's hand-back. A cancel in between, and the hand-back after it, leave the depth at 0."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    h.policy(min_run=0)
    h.add_worker("w0", slots=1)
    low = h.submit("a", priority=1, max_tokens=6)
    h.append(h.run_of(low), 2)
    high = h.submit("b", priority=8, tenant="u", max_tokens=2)
    assert h.status(low) == "running" and h.waiting_rid("a") == low
    assert h.cancel(low)[0] == "cancelled"
    h.handback(h.run_of(low), reason="priority")
    h.complete(high)
    assert h.status(low) == "cancelled" and h.status(high) == "done"
    assert all(v == 0 for v in raw_depths(rc, ["default"]).values())


def test_a_ready_repeated_after_its_request_started_starts_nothing(rc: RedisCluster) -> None:
    """The ready step is idempotent: repeated for a head that already runs (a slow caller's retry, a
    repair pass that read the outbox before the start cleared it), it finds the run and leaves it."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    h.add_worker("w0", slots=2)
    new = NewRequest(session_id="s", max_tokens=2, priority=5, tenant="t", group="default", prompt="p")
    spec = h.scripts.call("submit", [keys.session_prefix("s")],
                          [new.request_id, "s", "t", "default", 5, 2, "p", "p", "{}", 1, ""])[2]
    assert h.scripts.call("ready", [keys.group_prefix("default")], [60_000, spec]) == "started"
    h.collect()
    assert h.scripts.call("ready", [keys.group_prefix("default")], [60_000, spec]) == "known"
    assert h.collect() == [] and h.dispatched_rids() == [new.request_id]
    h.complete(new.request_id)
    assert h.status(new.request_id) == "done"


def test_a_missed_preemption_notice_is_repeated_by_the_heartbeat(rc: RedisCluster) -> None:
    """On a cluster the worker's hand-back is what fences a preempted run: a notice it missed comes
    again with its next heartbeat, with the reason (its lease stays renewed meanwhile)."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    h.policy(min_run=0)
    h.add_worker("w0", slots=1)
    low = h.submit("low", priority=1, max_tokens=5)
    h.submit("high", priority=8, max_tokens=1)
    assert h.heartbeat("w0") == [f"{low}|1|priority"]
    assert h.status(low) == "running"  # not fenced until the worker hands it back
    h.handback(h.run_of(low), reason="priority")
    assert h.status(low) == "preempted"


def preempted_and_waiting(h: Harness, reason: str) -> tuple[str, Run]:
    """A request stopped for `reason` on the control plane (requeued at once) whose worker w0 has not
    handed it back yet, with 2 tokens streamed: its id and its stopped run."""
    h.policy(min_run=0)
    if reason == "priority":
        h.add_worker("w0", slots=1)
        h.submit("low", priority=1, max_tokens=6)
        h.submit("high", priority=8, tenant="u", max_tokens=2)  # takes the preempted run's slot at once
    else:
        h.add_worker("w0", slots=2)
        h.submit("f1", tenant="flood", max_tokens=6)
        h.submit("f2", tenant="flood", max_tokens=6)
        h.submit("calm", tenant="calm", max_tokens=2)  # takes one flood run's slot at once
    [notice] = h.heartbeat("w0")
    victim, attempt, said = notice.split("|")
    assert (attempt, said, h.status(victim)) == ("1", reason, "running")  # stopped on the control plane only
    stopped = h.run_of(victim)
    h.append(stopped, 2)
    return victim, stopped


def preemptions(rc: RedisCluster, h: Harness, rid: str) -> list[str | None]:
    """The reasons of the request's `preempted` events, in order."""
    return [d.get("reason") for e, r, d in log(rc, h.req(rid)["sid"]) if r == rid and e == "preempted"]


@pytest.mark.parametrize("reason", ["priority", "fair_share"])
def test_a_restart_before_the_hand_back_fences_the_stopped_attempt_with_its_reason(rc: RedisCluster,
                                                                                    reason: str) -> None:
    """A preempted request may start again on any free slot before its stopped attempt's hand-back
    reaches the data plane. That start fences the attempt, and its `preempted` event gives the control
    plane's reason (and the data plane counts it as a preemption), not "superseded". Its assignment,
    which carries the reason, holds its slot's ticket while it waits; the hand-back that comes later
    changes nothing."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    victim, stopped = preempted_and_waiting(h, reason)
    h.add_worker("w1", slots=1, collect=False)
    assert rc.lrange(keys.worker_inbox("default", "w1"), 0, -1) == [f"{victim}|2|{reason}"]
    h.add_worker("w1", slots=1, collect=False)  # offered again (after a lapse)
    assert "w1" not in rc.lrange(keys.group_key("default", "idle"), 0, -1), "a waiting assignment holds its slot"
    h.collect()  # w1 starts the victim's second attempt; the first has not been handed back
    resumed = h.run_of(victim)
    assert (resumed.wid, resumed.attempt, resumed.next_index) == ("w1", "2", 2)
    assert h.req(victim).get("pc") == "1"
    assert h.handback(stopped, reason=reason) == [0]
    h.complete(victim)
    assert preemptions(rc, h, victim) == [reason]
    events = [(e, d) for e, rid, d in log(rc, h.req(victim)["sid"]) if rid == victim]
    assert [e for e, _ in events if e in ("preempted", "resumed")] == ["preempted", "resumed"]
    assert [d["index"] for e, d in events if e == "token"] == list(range(6))


@pytest.mark.parametrize("shown", ["2", '{"engine":"openai","slots":2}'])  # a bare count; JSON without `inbox`
def test_a_worker_of_the_earlier_inbox_format_gets_no_reason_and_its_start_says_superseded(rc: RedisCluster,
                                                                                           shown: str) -> None:
    """A rolling upgrade: a worker that registered without declaring inbox format 2 would misread
    "rid|attempt|reason", so it gets "rid|attempt"; an early start then fences the stopped attempt as
    "superseded", as before, and the run goes on."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    victim, stopped = preempted_and_waiting(h, "priority")
    h.scripts.call("register_worker", [keys.group_prefix("default")], [60_000, "old", 2, 2, shown])
    inbox = rc.lrange(keys.worker_inbox("default", "old"), 0, -1)
    assert f"{victim}|2" in inbox and not any(entry.count("|") > 1 for entry in inbox)
    h.workers["old"], h.slots["old"] = "default", 2
    h.collect()
    assert h.run_of(victim).attempt == "2" and h.req(victim).get("pc") is None
    assert h.handback(stopped, reason="priority") == [0]
    h.complete(victim)
    assert preemptions(rc, h, victim) == ["superseded"]
    assert h.token_indices(h.req(victim)["sid"], victim) == list(range(6))


def test_a_carried_reason_fences_only_the_attempt_it_was_given_for(rc: RedisCluster) -> None:
    """Attempt 1 is stopped; attempt 2 is dispatched and stopped before its worker started it; attempt 3
    starts while attempt 1 still runs (neither worker handed back). Attempt 3 carries attempt 2's
    reason, so attempt 1 is fenced as "superseded"."""
    h = Harness(rc, lease_ms=60_000, cluster=True)
    victim, _ = preempted_and_waiting(h, "priority")
    h.add_worker("w1", slots=2, collect=False)  # attempt 2 and the high request wait in w1's inbox
    del h.workers["w1"]  # w1 never starts what it was sent (the harness's submits collect)
    assert f"{victim}|2|priority" in rc.lrange(keys.worker_inbox("default", "w1"), 0, -1)
    # two more of a higher class than any running: w0's slot is being freed for one, attempt 2 (the
    # lowest class running) is stopped for the other
    h.submit("higher-1", priority=9, tenant="v", max_tokens=2)
    h.submit("higher-2", priority=9, tenant="v", max_tokens=2)
    h.add_worker("w2", slots=3, collect=False)
    assert f"{victim}|3|priority" in rc.lrange(keys.worker_inbox("default", "w2"), 0, -1)
    h.collect()
    assert h.run_of(victim).attempt == "3" and h.status(victim) == "running"
    assert preemptions(rc, h, victim) == ["superseded"]
