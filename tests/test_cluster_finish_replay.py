"""A worker's run end on a cluster whose data-plane call landed but whose reply was lost (the connection broke):
the worker sends the whole end again (workers/worker.py `_end`: a fresh EndProgress has no reply to take up
from). The data plane refuses it as an end (0, as one server does a resent end), but its reply carries the first
one's counts (sessions/lua/includes/requests.lua, `ended_by`): the release still reconciles the backend's prompt
count, and the session's next request is readied at once, not by the repair pass seconds later. One server ends
a run in one call (skipped there)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import EndProgress, run_sync
from sluicegate.workers.redis_retry import through_dropped_connections
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness, Run

pytestmark = pytest.mark.skipif(not ON_CLUSTER, reason="a cluster's end is two calls; one server's is one")

LEASE = 60_000
USAGE = {"prompt_tokens": 500, "completion_tokens": 2, "total_tokens": 502}


def lose_reply_of(h: Harness, function: str) -> None:
    """The next call of `function` runs on the store, but its reply is lost (the connection breaks)."""
    call = h.scripts.call

    def lossy(name: str, keys_: Sequence[Any], args: Sequence[Any]) -> Any:
        reply = call(name, keys_, args)
        if name == function and h.scripts.call is lossy:
            h.scripts.call = call  # type: ignore[method-assign]
            raise redis.ConnectionError("connection lost while reading the reply")
        return reply

    h.scripts.call = lossy  # type: ignore[method-assign]


def end_as_worker(h: Harness, run: Run, **end: Any) -> bool:
    """End a run as the worker does: through dropped connections, its retries sharing one EndProgress."""
    if run in h.runs:
        h.runs.remove(run)
    progress = EndProgress()
    answers: list[bool] = []

    async def once() -> None:
        if "outcome" in end:
            answers.append(await h.t.finish(run.rid, run.attempt, wid=run.wid, group=run.group, return_slot=True,
                                            progress=progress, **end))
        else:
            answers.append(await h.t.hand_back(run.rid, run.attempt, wid=run.wid, group=run.group,
                                               return_slot=True, progress=progress, **end))

    asyncio.run(through_dropped_connections(once, seconds=5, what="test end"))
    h.collect()
    return answers[-1]


def two_in_a_session(h: Harness, sid: str, tenant: str) -> tuple[str, str, Run]:
    first = h.submit(sid, tenant=tenant, max_tokens=2)
    second = h.submit(sid, tenant=tenant, max_tokens=2)
    run = h.run_of(first)
    h.append(run, 2)
    return first, second, run


def test_a_done_end_resent_after_its_reply_was_lost_reconciles_and_readies_as_the_first(r: redis.Redis) -> None:
    h = Harness(r, lease_ms=LEASE, cluster=True)
    h.add_worker("w0", slots=2)
    # the contrast: tenant "a" ends its run with its reply received
    a_first, a_second, a_run = two_in_a_session(h, "sa", "a")
    b_first, b_second, b_run = two_in_a_session(h, "sb", "b")
    a0, b0 = h.vtc("a"), h.vtc("b")
    assert end_as_worker(h, a_run, outcome="done", detail="stop", usage=USAGE)
    lose_reply_of(h, "finish")
    finished = end_as_worker(h, b_run, outcome="done", detail="stop", usage=USAGE)
    assert h.status(b_first) == "done"
    # the backend's prompt count (500, not the estimate) reconciled as in the contrast
    assert (h.vtc("b") - b0, h.vtc("a") - a0) == (h.vtc("a") - a0, h.vtc("a") - a0)
    assert h.vtc("b") != b0
    # the session's next request readied (and started in the freed slot) at once, not left to the repair pass
    assert (h.status(a_second), h.status(b_second)) == ("running", "running")
    assert [e.event for e in h.events("sb", b_first)].count("done") == 1
    assert not finished  # this call did not end it (the first did), as one server answers a resent end


def test_a_failed_end_resent_after_its_reply_was_lost_readies_the_next_request(r: redis.Redis) -> None:
    h = Harness(r, lease_ms=LEASE, cluster=True)
    h.add_worker("w0", slots=1)
    first, second, run = two_in_a_session(h, "s", "t")
    lose_reply_of(h, "finish")
    finished = end_as_worker(h, run, outcome="failed", detail="worker error: boom")
    assert (h.status(first), h.req(first)["err"], h.status(second)) == ("failed", "worker error: boom", "running")
    assert not finished


def test_a_last_hand_back_resent_after_its_reply_was_lost_readies_the_next_request(r: redis.Redis) -> None:
    h = Harness(r, lease_ms=LEASE, cluster=True)
    h.t.max_attempts = 1  # the backend's failure ends the request
    h.add_worker("w0", slots=1)
    first, second, run = two_in_a_session(h, "s", "t")
    lose_reply_of(h, "handback")
    stopped = end_as_worker(h, run, reason="backend_error: 502")
    assert (h.status(first), h.status(second)) == ("failed", "running")
    assert not stopped


@pytest.mark.parametrize("reason", ["worker_shutdown", "backend_error: 502"])
def test_a_resent_hand_back_that_put_the_request_back_still_requeues_it(r: redis.Redis, reason: str) -> None:
    h = Harness(r, lease_ms=LEASE, cluster=True)
    h.add_worker("w0", slots=1)
    first, second, run = two_in_a_session(h, "s", "t")
    lose_reply_of(h, "handback")
    assert not end_as_worker(h, run, reason=reason)  # refused, as before: its spec requeues it
    assert (h.status(first), h.status(second)) == ("running", "queued")  # the freed slot took it again
    assert h.run_of(first).attempt == "2"


def test_a_late_end_of_a_run_the_sweep_failed_is_still_refused(r: redis.Redis) -> None:
    """Same attempt, same worker, ended failed by the sweep (worker lost at --max-attempts): not this end."""
    h = Harness(r, lease_ms=LEASE, cluster=True)
    h.t.max_attempts = 1
    h.add_worker("w0", slots=1)
    first, second, run = two_in_a_session(h, "s", "t")
    stopped = run_sync(h.t._call("handback", [keys.request_prefix(first)],
                                 [first, run.attempt, "", "worker_lost", 1, 3600]))
    assert int(stopped[0]) == 1 and h.status(first) == "failed"
    assert not end_as_worker(h, run, outcome="failed", detail="worker error: boom")
    assert not end_as_worker(h, run, outcome="done", detail="stop", usage=USAGE)
    # not taken for its own end: no next head in the reply (the sweep's caller and the repair pass ready it)
    assert h.status(second) == "queued"


def test_a_done_end_failed_for_its_missed_deadline_resent_readies_the_next_request(r: redis.Redis) -> None:
    """A done end past a `fail` deadline with no first token ended the request failed (d_finish): its resend
    is taken for the same end."""
    h = Harness(r, lease_ms=LEASE, cluster=True)
    h.add_worker("w0", slots=1)
    first = h.submit("s", max_tokens=2, deadline_ms=50, fail_on_miss=True)
    second = h.submit("s", max_tokens=2)
    run = h.run_of(first)
    time.sleep(0.15)  # the servers' own clock passes the deadline
    lose_reply_of(h, "finish")
    finished = end_as_worker(h, run, outcome="done", detail="stop")
    assert h.status(first) == "failed" and h.req(first)["err"].startswith("deadline_exceeded: no first token")
    assert h.status(second) == "running"
    assert not finished
