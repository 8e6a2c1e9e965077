"""A tokens/s quota's new rate or size applies from the change on, never to the time before it.

The bucket stores its level as of its last dispatch or refund (qs lvl, at) and is read as that level refilled at
the rate set when it is read (quotas.lua token_level). scheduler/lua/set_quota.lua settles the bucket under the
old settings before writing the new ones; without that, a raised rate credited tokens the old one never gave, a
lowered one took back tokens it had already given, and a raised burst_tokens turned an idle hour's refill into
tokens at once. The stats' level (scheduler/admin.py, token_bucket_level) reads the settled bucket as the
scheduler does.
"""

from __future__ import annotations

import time

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, submit, wait_for
from tests.sched_harness import T0, Harness


def emptied(r: redis.Redis, rate: float) -> tuple[Harness, str]:
    """A 1,000-token bucket emptied at T0 by a run, and a 900-token request waiting on it."""
    h = Harness(r)
    h.set_quota("default", tokens_per_second=rate, burst_tokens=1000)
    h.add_worker("w", slots=10)
    first = h.submit("a", max_tokens=1000)
    second = h.submit("b", max_tokens=900)
    assert (h.status(first), h.status(second)) == ("running", "queued")
    return h, second


@pytest.mark.single_server  # the pinned clock: a global key, which a cluster's functions cannot read
def test_a_raised_rate_does_not_credit_the_time_before_the_change(r: redis.Redis) -> None:
    h, second = emptied(r, 1)
    h.set_clock(T0 + 10_000)  # 10 s at 1 token/s: the bucket holds 10
    h.set_quota("default", tokens_per_second=100)
    h.sweep()
    assert h.status(second) == "queued"  # the old code read 10 s at 100/s: 1,000 tokens, and started it
    qs = r.hgetall(keys.group_key("default", "qs"))
    assert float(qs["lvl"]) == pytest.approx(10, abs=0.01) and float(qs["at"]) == T0 + 10_000
    assert float(qs["qwake"]) == pytest.approx(T0 + 10_000 + 8_900, abs=1)  # 890 more at 100/s
    h.set_clock(T0 + 18_900)
    h.sweep()
    assert h.status(second) == "running"


@pytest.mark.single_server
def test_a_lowered_rate_keeps_what_the_old_rate_gave(r: redis.Redis) -> None:
    h, second = emptied(r, 10)
    h.set_clock(T0 + 50_000)  # 50 s at 10 tokens/s: the bucket holds 500
    h.set_quota("default", tokens_per_second=1)
    h.sweep()
    qwake = float(r.hget(keys.group_key("default", "qs"), "qwake"))
    assert qwake == pytest.approx(T0 + 450_000, abs=1)  # 400 more at 1/s (the old code: T0 + 900 s)
    assert h.status(second) == "queued"


@pytest.mark.single_server
def test_a_raised_burst_does_not_credit_the_idle_time_before_the_change(r: redis.Redis) -> None:
    h = Harness(r)
    h.set_quota("default", tokens_per_second=10, burst_tokens=100)
    h.add_worker("w", slots=10)
    first = h.submit("a", max_tokens=100)  # the whole bucket at T0
    assert h.status(first) == "running"
    h.set_clock(T0 + 3_600_000)  # an hour later: the bucket has been full (100) for most of it
    h.set_quota("default", burst_tokens=100_000)
    big = h.submit("b", max_tokens=30_000)
    assert h.status(big) == "queued"  # the old code read the hour at 10/s: 36,000, capped at 100,000
    assert float(r.hget(keys.group_key("default", "qs"), "lvl")) == pytest.approx(100, abs=0.01)


@pytest.mark.single_server
def test_a_change_before_the_first_dispatch_leaves_a_full_bucket(r: redis.Redis) -> None:
    """No lvl yet: the bucket is full at whatever burst applies, as before; nothing is stored by the change."""
    h = Harness(r)
    h.set_quota("default", tokens_per_second=10, burst_tokens=100)
    h.set_quota("default", burst_tokens=1000)
    assert "lvl" not in r.hgetall(keys.group_key("default", "qs"))
    h.add_worker("w", slots=10)
    assert h.status(h.submit("a", max_tokens=1000)) == "running"


def level(base: str) -> float:
    return float(call("GET", f"{base}/v1/admin/stats")[1]["groups"][0]["token_bucket_level"])


def test_the_stats_level_keeps_the_old_rates_refill_at_a_lowered_rate(stack: Stack) -> None:
    """Live, on either form: the level the stats show does not drop at a lowered rate (the old code re-read the
    seconds since the last dispatch at the new rate: about 150 tokens fewer here)."""
    base = stack.base_url
    assert call("PUT", f"{base}/v1/admin/groups/default", {"tokens_per_second": 100, "burst_tokens": 1000})[0] == 200
    first = submit(base, "a", max_tokens=1000)  # the whole bucket; the sim runs it in 2.5 s
    wait_for(lambda: call("GET", f"{base}/v1/requests/{first}")[1]["status"] == "done", timeout=20, what="first")
    time.sleep(1.5)  # at least 1.5 s since the bucket's last dispatch or refund: 150 tokens at 100/s
    before = level(base)
    assert before < 900  # below the burst: the level is the refill's, not the cap
    assert call("PUT", f"{base}/v1/admin/groups/default", {"tokens_per_second": 10})[0] == 200
    after = level(base)
    assert after >= before - 1, (before, after)
