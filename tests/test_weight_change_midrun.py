"""A tenant's weight changed while one of its runs is in flight: the run's end corrects the charge at the
weight the dispatch charged it at (the run record's tw), whether it finishes, is preempted or is cancelled.
Corrected at the new weight, a run charged 1000 at weight 1 that produced 10 tokens after the weight fell to
0.01 took 99,000 off its tenant's counter, and the tenant then had every dispatch for a long while."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness

PROMPT = "x" * 40  # 10 input tokens; the default policy charges w_in=1 per input, w_out=2 per output token


def test_a_weight_lowered_mid_run_corrects_at_the_weight_charged(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    h.policy(w_in=0, w_out=1, est=1)  # counters in output tokens
    h.add_worker("w1", slots=1)
    first = h.submit("a-0", tenant="a", max_tokens=1000)
    assert h.vtc("a") == 1000
    h.weight("a", 0.01)
    h.stop_after(first, 10)
    assert h.vtc("a") == 10  # charged 1000 at weight 1, 10 produced (not 1000 - 990 / 0.01)
    # and the fair order holds: at a hundredth of b's weight, a gets about one dispatch in a hundred
    for i in range(1, 31):
        h.submit(f"a-{i}", tenant="a", max_tokens=10)
        h.submit(f"b-{i}", tenant="b", max_tokens=10)
    order = []
    for _ in range(30):
        run = h.runs[0]
        order.append(h.req(run.rid)["tn"])
        h.complete(run.rid)
    assert Counter(order)["a"] <= 2, "".join(order)


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_weight_raised_mid_run_corrects_a_preempted_run_at_the_weight_charged(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=0)
    h.weight("t", 2)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", tenant="t", max_tokens=100, prompt=PROMPT)
    assert h.vtc("t") == (10 + 2 * 100) / 2
    h.append(h.run_of(rid), 10)
    h.weight("t", 8)
    h.submit("h", tenant="u", priority=9, max_tokens=5, prompt=PROMPT)
    assert h.status(rid) == "preempted"
    assert h.vtc("t") == (10 + 2 * 10) / 2  # not 105 - 180 / 8


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_weight_raised_mid_run_corrects_a_cancelled_run_at_the_weight_charged(r: redis.Redis) -> None:
    h = Harness(r)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", tenant="t", max_tokens=100, prompt=PROMPT)
    assert h.vtc("t") == 10 + 2 * 100
    h.append(h.run_of(rid), 10)
    h.weight("t", 4)
    h.cancel(rid)
    assert h.vtc("t") == 10 + 2 * 10  # not 210 - 180 / 4


def test_a_run_record_without_its_weight_is_corrected_at_the_weight_now(r: redis.Redis) -> None:
    """A record written before the weight was kept in it (a rolling upgrade): the weight now, as before."""
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", tenant="t", max_tokens=100, prompt=PROMPT)
    run = h.run_of(rid)
    ri, key = keys.group_key("default", "ri"), f"{rid}|{run.attempt}"
    record = json.loads(r.hget(ri, key))
    assert record.pop("tw") == 1
    r.hset(ri, key, json.dumps(record))
    h.weight("t", 2)
    h.append(run, 10)
    h.finish(run, detail="stop")
    assert h.vtc("t") == 10 + 2 * 100 - 2 * 90 / 2
