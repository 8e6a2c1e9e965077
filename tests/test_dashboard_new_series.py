"""The dashboard's tokens/s counts a (group, priority, tenant) series from 0 when it first appears: a series
missing from the previous reading was read as "no change", so a tenant's first tokens at a priority or in a
group never showed (in `tokens_per_second` nor in its `tenant_share`), which skewed the fairness view
against new arrivals. The stream's first event still shows no burst for what was streamed before it opened."""

from __future__ import annotations

import redis

from sluicegate.api.dashboard_routes import rates
from sluicegate.sessions import keys
from tests.helpers import Stack
from tests.test_stream_tokens import stats_events


def test_a_new_series_counts_from_zero_and_a_first_reading_shows_no_burst() -> None:
    before = {"default|5|old": 100.0}
    after = {"default|5|old": 120.0, "default|7|acme": 50.0, "batch|5|old": 30.0}
    assert rates(before, after, 2.0) == {"total": 50.0, "by_group": {"default": 35.0, "batch": 15.0},
                                         "by_tenant": {"old": 25.0, "acme": 25.0}}
    assert rates(after, after, 1.0)["total"] == 0.0  # the first reading is its own `before`


def test_the_stats_stream_shows_a_new_tenants_first_tokens(stack: Stack, r: redis.Redis) -> None:
    """Tokens counted as the data plane counts them (sessions/lua/includes/metrics.lua `count`), written
    directly: one interval's worth of a series unknown to the previous event."""
    metrics = keys.data_metrics(keys.all_buckets()[0])
    r.hincrby(metrics, "tokens|default|5|old", 500)  # streamed before the stream opened
    events = stats_events(stack.base_url, "/v1/admin/stats/stream?interval=1", 2)
    first = next(events)
    assert first["tokens_per_second"] == {"total": 0.0, "by_group": {"default": 0.0}, "by_tenant": {"old": 0.0}}
    r.hincrby(metrics, "tokens|default|7|acme", 50)  # acme's first tokens, at a priority it never used
    second = next(events)
    events.close()
    assert second["tokens_per_second"]["by_tenant"]["acme"] > 0
    assert second["tokens_per_second"]["by_tenant"]["old"] == 0.0
    share = {s["tenant"]: s for s in second["tenant_share"]}
    assert share["acme"]["token_share"] == 1.0 and "old" not in share
