"""A request's failed attempts are bounded (--max-attempts), and a finished request reports the
backend's finish_reason and usage, with which the fairness and quota counters reconcile.

The scripts are driven directly (tests/sched_harness.py), on one server and on a cluster: a test
plays the workers, so it can lose one, fail a backend call or finish with a usage at will.
"""

from __future__ import annotations

import json

import redis

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import run_sync
from tests.helpers import ON_CLUSTER
from tests.metrics_helpers import raw_depths
from tests.sched_harness import Harness


def harness(r: redis.Redis, max_attempts: int) -> Harness:
    h = Harness(r, cluster=ON_CLUSTER)
    h.t.max_attempts = max_attempts
    return h


def lose_worker(h: Harness, r: redis.Redis, rid: str) -> None:
    """The worker holding `rid` stops heartbeating: its lease lapses and the sweep takes the run back."""
    run = h.run_of(rid)
    r.zadd(keys.group_key("default", "leases"), {f"{rid}|{run.attempt}": 0})
    r.delete(keys.worker("default", run.wid))  # not heard from for its lease (a worker still beating is not lost)
    h.sweep()
    h.runs.remove(run)
    h.heartbeat(run.wid)  # retired by the sweep: it rejoins and offers its slot again
    h.collect()


def test_a_request_whose_worker_keeps_being_lost_fails_after_max_attempts(r: redis.Redis) -> None:
    h = harness(r, max_attempts=3)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", max_tokens=10)
    behind = h.submit("s", max_tokens=2)  # the session's next request: it runs once the first one ends
    for lost in range(1, 3):
        h.append(h.run_of(rid), 2)
        lose_worker(h, r, rid)
        assert h.status(rid) == "running" and h.req(rid)["fl"] == str(lost)
    h.append(h.run_of(rid), 1)
    lose_worker(h, r, rid)
    assert h.status(rid) == "failed"
    error = [e for e in h.events("s", rid) if e.event == "error"]
    assert len(error) == 1 and "failed 3 attempts (--max-attempts 3); last: worker_lost" in error[0].data["message"]
    assert error[0].data["tokens"] == 5
    # the session moved on: its next request runs on the freed slot, and finishes
    h.complete(behind)
    assert h.status(behind) == "done"
    assert not h.running() and h.r.llen(keys.group_key("default", "idle")) == 1  # the one ticket is back


def test_only_failures_count_preemptions_and_hand_backs_do_not(r: redis.Redis) -> None:
    h = harness(r, max_attempts=2)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", max_tokens=10)
    for _ in range(4):  # graceful hand-backs (a worker shutting down) never use up attempts
        h.handback(h.run_of(rid), reason="worker_shutdown")
    assert h.status(rid) == "running" and "fl" not in h.req(rid)
    h.append(h.run_of(rid), 3)
    h.handback(h.run_of(rid), reason="backend_error: backend stream broke after 3 tokens: reset")
    assert h.status(rid) == "running" and h.req(rid)["fl"] == "1"
    h.handback(h.run_of(rid), reason="backend_error: no token for 2 s (--backend-idle-timeout)")
    assert h.status(rid) == "failed"
    message = [e for e in h.events("s", rid) if e.event == "error"][0].data["message"]
    assert message.endswith("last: backend_error: no token for 2 s (--backend-idle-timeout)")
    assert [e.data["reason"] for e in h.events("s", rid) if e.event == "preempted"] == ["worker_shutdown"] * 4 + [
        "backend_error"]
    assert r.llen(keys.group_key("default", "idle")) == 1


def finish_with(h: Harness, rid: str, reason: str, usage: dict[str, int] | None) -> None:
    run = h.run_of(rid)
    h.runs.remove(run)
    assert run_sync(h.t.finish(run.rid, run.attempt, wid=run.wid, group=run.group, outcome="done", detail=reason,
                               return_slot=True, usage=usage))


def test_done_carries_the_backends_finish_reason_and_usage_and_the_counters_reconcile(r: redis.Redis) -> None:
    h = harness(r, max_attempts=5)
    h.policy(w_in=1, w_out=2, est=1)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", tenant="acme", max_tokens=10)
    estimate = int(h.req(rid)["it"])
    assert h.vtc("acme") == estimate + 2 * 10  # charged at dispatch: input estimate, max_tokens
    h.append(h.run_of(rid), 4)
    finish_with(h, rid, "tool_calls", {"prompt_tokens": estimate + 7, "completion_tokens": 6, "total_tokens": 99})
    done = [e for e in h.events("s", rid) if e.event == "done"][0].data
    assert done["finish_reason"] == "tool_calls" and done["tokens"] == 4
    assert done["usage"] == {"prompt_tokens": estimate + 7, "completion_tokens": 6, "total_tokens": 99}
    assert json.loads(h.req(rid)["us"])["completion_tokens"] == 6 and h.req(rid)["fr"] == "tool_calls"
    assert h.vtc("acme") == (estimate + 7) + 2 * 6  # the backend's counts, not the estimate nor the events

    other = h.submit("s2", tenant="beta", max_tokens=10)
    h.append(h.run_of(other), 3)
    finish_with(h, other, "stop", None)  # no usage reported: Sluicegate's own count stands
    done = [e for e in h.events("s2", other) if e.event == "done"][0].data
    estimate = int(h.req(other)["it"])
    assert done["usage"] == {"prompt_tokens": estimate, "completion_tokens": 3, "total_tokens": estimate + 3}
    assert done["finish_reason"] == "stop"


def test_a_resumed_run_reconciles_only_the_output_of_its_own_attempt(r: redis.Redis) -> None:
    """The usage a finish reports is the whole request's; an attempt that started at index n charged
    (and is reconciled for) only what it produced."""
    h = harness(r, max_attempts=5)
    h.policy(w_in=1, w_out=1, est=1)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", tenant="acme", max_tokens=10)
    estimate = int(h.req(rid)["it"])
    h.append(h.run_of(rid), 4)
    h.handback(h.run_of(rid), reason="worker_shutdown")  # the first attempt produced 4: charged 4
    assert h.vtc("acme") == estimate + 4 + 6  # the second attempt reserved the remaining 6
    h.append(h.run_of(rid), 5)
    finish_with(h, rid, "stop", {"prompt_tokens": estimate, "completion_tokens": 9, "total_tokens": estimate + 9})
    assert h.vtc("acme") == estimate + 9


def test_a_preempted_run_whose_hand_back_fails_it_leaves_no_waiting_entry(r: redis.Redis) -> None:
    """On a cluster the control plane requeues a preempted run at once and the worker's hand-back fences
    it later; when that hand-back reports the request's last allowed failure, the request ends, and
    its waiting entry must go with it (it was dispatched for nothing, and counted as queued)."""
    h = harness(r, max_attempts=1)
    h.policy(min_run=0)
    h.add_worker("w1", slots=1)
    low = h.submit("low", priority=2, max_tokens=50)
    after = h.submit("low", priority=2, max_tokens=2)  # the session's next request
    h.append(h.run_of(low), 2)
    high = h.submit("high", priority=9, max_tokens=3)
    h.handback(h.run_of(low), reason="backend_error: the stream broke")
    cp = keys.group_key("default", "")
    if ON_CLUSTER:
        waiting = h.waiting_rid("low")
        assert waiting is None or waiting == after  # not the failed request
    h.complete(high)
    if not ON_CLUSTER:  # one server: it was preempted in the decision's own call, and resumes now
        h.complete(low)
    h.complete(after)
    depth = raw_depths(r, ["default"])  # the sum of the data planes' and the control plane's shares
    if ON_CLUSTER:  # the hand-back came first on the data plane: the request failed there
        assert h.status(low) == "failed" and h.status(after) == "done" and r.hget(cp + "rq", "low") is None
        assert all(v == 0 for v in depth.values()), depth
        assert not h.running() and h.dispatched_rids().count(low) == 1
    else:  # one server: the preemption fenced the run in its own call; the late hand-back is no failure
        assert h.status(low) == "done" and h.status(after) == "done" and h.req(low).get("fl") is None
