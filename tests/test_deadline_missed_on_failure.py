"""A deadline is a time-to-first-token objective: a request that ends with no first token after its deadline
passed missed it, whatever its `on_deadline_miss` (README, Deadlines). With the default `"run"` a request that
failed past its deadline (its engine's permanent error, or its last `--max-attempts` attempt) showed
`deadline_met: null` and was not counted; only a `fail` deadline's was. The miss is recorded where every end
goes (requests.lua `finalize`), once: a `fail` deadline's own end is not counted twice.

And a finish resent with its last tokens after it ended the request failed (a `done` past a `fail` deadline)
writes nothing and is no fenced write, as a resent `done` end is not (requests.lua `append_tail`)."""

from __future__ import annotations

import json
import time

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import Tail, run_sync
from tests.sched_harness import Harness, Run

DEADLINE_MS = 300
CLUSTER = [pytest.param(False, marks=pytest.mark.single_server), True]


def past_the_deadline(h: Harness, cluster: bool) -> None:
    """The clock past DEADLINE_MS after the submit: a cluster's is the servers' own, one server's is pinned."""
    if cluster:
        time.sleep(DEADLINE_MS / 1000 + 0.05)
    else:
        h.advance(DEADLINE_MS + 50)


def started(r: redis.Redis, cluster: bool, *, fail: bool = False, deadline_ms: int = DEADLINE_MS,
            max_attempts: int | None = None) -> tuple[Harness, str, Run]:
    """A request with a deadline started on the only worker slot, no first token yet."""
    h = Harness(r, cluster=cluster)
    if max_attempts is not None:
        h.t.max_attempts = max_attempts
    h.add_worker("w", slots=1)
    rid = h.submit("s", tenant="t", priority=4, max_tokens=20, deadline_ms=deadline_ms, fail_on_miss=fail)
    return h, rid, h.run_of(rid)


def missed(r: redis.Redis, rid: str) -> int:
    return int(r.hget(keys.request_prefix(rid) + "m", "deadlines|default|4|missed") or 0)


def fenced(r: redis.Redis, rid: str) -> int:
    return int(r.hget(keys.request_prefix(rid) + "m", "fenced|default") or 0)


@pytest.mark.parametrize("cluster", CLUSTER)
def test_a_run_deadline_failed_by_its_engine_past_the_deadline_is_missed(r: redis.Redis, cluster: bool) -> None:
    h, rid, run = started(r, cluster)
    before = missed(r, rid)
    past_the_deadline(h, cluster)
    h.finish(run, outcome="failed", detail="backend said 400: bad request")
    assert (h.status(rid), h.req(rid)["err"]) == ("failed", "backend said 400: bad request")  # its own message
    assert h.req(rid).get("dmt") == "0"  # deadline_met: false
    assert missed(r, rid) == before + 1


@pytest.mark.parametrize("cluster", CLUSTER)
def test_a_run_deadline_failed_for_its_attempts_past_the_deadline_is_missed(r: redis.Redis, cluster: bool) -> None:
    h, rid, run = started(r, cluster, max_attempts=1)
    before = missed(r, rid)
    past_the_deadline(h, cluster)
    h.handback(run, reason="backend_error: 503")
    assert h.status(rid) == "failed"
    assert h.req(rid)["err"].startswith("failed 1 attempts (--max-attempts 1)")
    assert h.req(rid).get("dmt") == "0"
    assert missed(r, rid) == before + 1


@pytest.mark.parametrize("cluster", CLUSTER)
def test_a_run_deadline_ended_done_without_a_token_past_the_deadline_is_missed(r: redis.Redis,
                                                                                cluster: bool) -> None:
    h, rid, run = started(r, cluster)
    before = missed(r, rid)
    past_the_deadline(h, cluster)
    h.finish(run, outcome="done", detail="stop")  # the engine gave nothing
    assert h.status(rid) == "done" and h.req(rid).get("dmt") == "0"
    assert missed(r, rid) == before + 1


@pytest.mark.parametrize("cluster", CLUSTER)
def test_a_request_failed_within_its_deadline_stays_unjudged(r: redis.Redis, cluster: bool) -> None:
    h, rid, run = started(r, cluster, deadline_ms=60_000)
    before = missed(r, rid)
    h.finish(run, outcome="failed", detail="backend said 400: bad request")
    assert h.status(rid) == "failed" and "dmt" not in h.req(rid)  # deadline_met: null
    assert missed(r, rid) == before


@pytest.mark.parametrize("cluster", CLUSTER)
def test_a_request_failed_after_its_first_token_keeps_its_judgement(r: redis.Redis, cluster: bool) -> None:
    h, rid, run = started(r, cluster)
    h.append(run, 1)  # in time: met
    past_the_deadline(h, cluster)
    before = missed(r, rid)
    h.finish(run, outcome="failed", detail="backend said 400: bad request")
    assert h.req(rid).get("dmt") == "1" and missed(r, rid) == before


@pytest.mark.parametrize("cluster", CLUSTER)
@pytest.mark.parametrize("end", ["attempts", "timer", "done"])
def test_a_fail_deadline_missed_is_counted_once(r: redis.Redis, cluster: bool, end: str) -> None:
    h, rid, run = started(r, cluster, fail=True, max_attempts=1)
    before = missed(r, rid)
    past_the_deadline(h, cluster)
    if end == "attempts":
        h.handback(run, reason="backend_error: 503")
    elif end == "timer":
        h.finish(run, outcome="failed", detail="deadline_exceeded")
    else:
        h.finish(run, outcome="done", detail="stop")
    assert h.status(rid) == "failed" and h.req(rid).get("dmt") == "0"
    if end != "attempts":
        assert h.req(rid)["err"].startswith("deadline_exceeded: no first token")
    assert missed(r, rid) == before + 1


@pytest.mark.parametrize("cluster", CLUSTER)
def test_a_resent_finish_with_a_tail_that_failed_the_request_counts_no_fenced_write(r: redis.Redis,
                                                                                   cluster: bool) -> None:
    h, rid, run = started(r, cluster, fail=True)
    before_fenced, before_missed = fenced(r, rid), missed(r, rid)
    past_the_deadline(h, cluster)
    h.runs.remove(run)
    tail = Tail(0, [json.dumps({"request_id": rid, "index": i, "text": "t"}) for i in range(3)])

    def finish() -> bool:
        return run_sync(h.t.finish(rid, run.attempt, wid=run.wid, group=run.group, outcome="done", detail="length",
                                   return_slot=True, tail=tail))

    assert finish()  # its tail refused (past the `fail` deadline), the request ended failed by this end
    assert h.status(rid) == "failed" and h.req(rid)["err"].startswith("deadline_exceeded: no first token")
    assert not finish()  # resent (its reply lost): nothing written, no fenced write
    assert (fenced(r, rid) - before_fenced, h.req(rid)["n"], missed(r, rid) - before_missed) == (0, "0", 1)
