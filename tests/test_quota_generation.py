"""A tokens/s quota removed and set again is a new bucket: the runs that reserved from the removed one give the
new one nothing back (their ends credited their unused reservation to it, a free refill per run: 1,800 tokens
reserved at one instant from a 1,000-token bucket). The admin API bumps the bucket's generation (qs tgen) at
each removal (scheduler/admin.py set_quota); a run records the generation it reserved from, and its end refunds
only into that one (scheduler/lua/includes/quotas.lua quota_refund). On the cluster path the clock is the
servers' own: the rate is 1 token/s, so the bucket refills next to nothing while a test runs."""

from __future__ import annotations

import pytest
import redis

from sluicegate.sessions import keys
from tests.sched_harness import Harness

# one server with the pinned clock (a global key, which a cluster's functions cannot read), and the cluster path
MODES = [pytest.param(False, marks=pytest.mark.single_server), True]
RATE = {"tokens_per_second": 1, "burst_tokens": 1000}


def set_quota(h: Harness, **fields: float | None) -> None:
    """Through the admin code path (Tuning.set_quota), on either form: None removes a field."""
    h.set_quota("default", **fields)


@pytest.mark.parametrize("cluster", MODES)
def test_runs_reserved_under_a_removed_tokens_quota_give_a_readded_one_nothing(r: redis.Redis, cluster: bool) -> None:
    h = Harness(r, cluster=cluster)
    set_quota(h, **RATE)
    h.add_worker("w", slots=10)
    old = h.submit("o", tenant="t", max_tokens=1000)  # reserves the whole bucket
    assert h.status(old) == "running"
    set_quota(h, tokens_per_second=None)  # removed while it runs
    set_quota(h, **RATE)  # set again: a new, full bucket
    new = [h.submit(f"n{i}", tenant="t", max_tokens=900) for i in range(3)]
    assert [h.status(x) for x in new] == ["running", "queued", "queued"]  # the first took 900 of the new 1,000
    h.stop_after(old, 10)  # 990 unused, reserved from the removed bucket
    h.sweep()
    assert [h.status(x) for x in new] == ["running", "queued", "queued"]
    assert float(r.hget(keys.group_key("default", "qs"), "lvl")) < 900


@pytest.mark.parametrize("cluster", MODES)
def test_a_run_under_a_readded_tokens_quota_gives_its_unused_tokens_back(r: redis.Redis, cluster: bool) -> None:
    h = Harness(r, cluster=cluster)
    set_quota(h, **RATE)
    set_quota(h, tokens_per_second=None)
    set_quota(h, **RATE)  # generation 1: its runs refund into it
    h.add_worker("w", slots=10)
    first = h.submit("a", tenant="t", max_tokens=1000)
    second = h.submit("b", tenant="t", max_tokens=900)
    assert (h.status(first), h.status(second)) == ("running", "queued")
    h.stop_after(first, 10)  # 990 unused go back: the second fits
    h.sweep()
    assert h.status(second) == "running"


@pytest.mark.parametrize("cluster", MODES)
def test_a_rate_change_keeps_the_bucket_and_its_refunds(r: redis.Redis, cluster: bool) -> None:
    """Only a removal starts a new bucket: a run reserved before the rate was changed still refunds."""
    h = Harness(r, cluster=cluster)
    set_quota(h, **RATE)
    h.add_worker("w", slots=10)
    first = h.submit("a", tenant="t", max_tokens=1000)
    set_quota(h, tokens_per_second=2)  # the same bucket, refilled faster (burst_tokens stays 1,000)
    second = h.submit("b", tenant="t", max_tokens=900)
    assert (h.status(first), h.status(second)) == ("running", "queued")
    h.stop_after(first, 10)
    h.sweep()
    assert h.status(second) == "running"
