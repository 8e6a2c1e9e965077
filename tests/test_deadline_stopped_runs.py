"""A `"on_deadline_miss": "fail"` deadline still binds a request whose run was stopped before its first token.

- On a cluster, a preemption requeues the request on the control plane at once, and its data plane says
  it stopped only with the hand-back. A deadline sweep that came in between found it still running there
  (kept) and had taken its entry out of dld: the hand-back must note the deadline again, or nothing ends
  the request past it (it stayed `preempted` until a dispatch picked it).
- A run stopped for the last of its `--max-attempts` after the deadline passed, with no first token, ends
  failed for its attempts, and its deadline counts as missed too (`deadline_met` false, the missed counter).
"""

from __future__ import annotations

import time

import pytest
import redis

from sluicegate.sessions import keys
from tests.sched_harness import Harness, Run

DEADLINE_MS = 300


def past_the_deadline(h: Harness, cluster: bool) -> None:
    """The clock past DEADLINE_MS after the submit: a cluster's is the servers' own, one server's is pinned."""
    if cluster:
        time.sleep(DEADLINE_MS / 1000 + 0.05)
    else:
        h.advance(DEADLINE_MS + 50)


def started_on_its_last_attempt(r: redis.Redis, cluster: bool, deadline_ms: int) -> tuple[Harness, str, Run]:
    """A request with a `fail` deadline started (no first token yet) on the only attempt --max-attempts allows."""
    h = Harness(r, cluster=cluster)
    h.t.max_attempts = 1
    h.add_worker("w", slots=1)
    a = h.submit("a", tenant="ta", priority=3, max_tokens=50, deadline_ms=deadline_ms, fail_on_miss=True)
    return h, a, h.run_of(a)


@pytest.mark.parametrize("cluster", [pytest.param(False, marks=pytest.mark.single_server), True])
def test_a_deadline_passed_between_a_preemption_and_its_hand_back_still_ends_the_request(
        r: redis.Redis, cluster: bool) -> None:
    h = Harness(r, cluster=cluster)
    h.add_worker("w", slots=1)
    h.policy(min_run=0)
    a = h.submit("a", tenant="ta", priority=3, max_tokens=50, deadline_ms=DEADLINE_MS, fail_on_miss=True)
    run = h.run_of(a)  # started, no first token yet
    hi = h.submit("hi", tenant="tb", priority=7, max_tokens=5)  # takes a's slot
    assert h.running() == [hi]
    past_the_deadline(h, cluster)
    h.sweep()  # on a cluster the data plane still runs a (its worker has not let go): kept
    h.handback(run, reason="priority")  # the worker lets go
    assert h.status(a) in ("preempted", "failed")
    h.sweep()
    assert h.status(a) == "failed"
    assert h.req(a)["err"].startswith("deadline_exceeded")
    assert h.req(a)["dmt"] == "0"
    assert h.running() == [hi]  # nothing dispatched it to fail it there


@pytest.mark.parametrize("cluster", [pytest.param(False, marks=pytest.mark.single_server), True])
def test_the_last_attempt_stopped_past_a_fail_deadline_counts_the_deadline_missed(
        r: redis.Redis, cluster: bool) -> None:
    h, a, run = started_on_its_last_attempt(r, cluster, DEADLINE_MS)
    past_the_deadline(h, cluster)
    missed_field = "deadlines|default|3|missed"
    metrics = keys.request_prefix(a) + "m"
    before = int(r.hget(metrics, missed_field) or 0)
    h.handback(run, reason="backend_error: 500")  # its only allowed attempt failed
    assert h.status(a) == "failed"
    assert h.req(a)["err"].startswith("failed 1 attempts (--max-attempts 1)")
    assert h.req(a)["dmt"] == "0"  # deadline_met: false
    assert int(r.hget(metrics, missed_field) or 0) == before + 1


@pytest.mark.parametrize("cluster", [pytest.param(False, marks=pytest.mark.single_server), True])
def test_the_last_attempt_stopped_within_its_deadline_leaves_the_deadline_undecided(
        r: redis.Redis, cluster: bool) -> None:
    h, a, run = started_on_its_last_attempt(r, cluster, 60_000)
    h.handback(run, reason="backend_error: 500")
    assert h.status(a) == "failed"
    assert "dmt" not in h.req(a)  # deadline_met: null (neither met nor missed when it ended)
