"""Group quotas gate dispatch: requests/s with burst (GCRA), tokens/s (reserved at dispatch, refunded at the
end) and max concurrency; exact with a pinned clock. A throttled group never blocks another one, a throttled
request is neither lost nor reordered, and quota changes apply on the next decision."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis
from redis.asyncio import ConnectionPool as AsyncConnectionPool
from redis.asyncio import Redis as AsyncRedis

from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings
from tests.sched_harness import T0, Harness


def qs(h: Harness, group: str = "default") -> dict[str, str]:
    return h.r.hgetall(keys.group_key(group, "qs"))


def queue(h: Harness, n: int, *, group: str = "default", max_tokens: int = 10, prefix: str = "s") -> list[str]:
    rids = []
    for i in range(n):
        rids.append(h.submit(f"{prefix}{i:02d}", group=group, max_tokens=max_tokens))  # ties: FIFO by name
    return rids


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_requests_per_second_with_burst(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("default", requests_per_second=2, burst=3)
    h.add_worker("w", slots=20)
    rids = queue(h, 12)
    assert len(h.dispatched) == 3  # the burst, at once
    *_, wake, _ = h.sweep()
    assert wake == T0 + 500 and len(h.dispatched) == 3
    h.set_clock(T0 + 499)
    assert h.sweep()[2] == 0
    h.set_clock(T0 + 500)
    assert h.sweep()[2] == 1
    assert h.sweep()[3] == T0 + 1000
    h.set_clock(T0 + 1000)
    assert h.sweep()[2] == 1
    h.set_clock(T0 + 1499)
    assert h.sweep()[2] == 0
    h.set_clock(T0 + 10_000)  # idle long enough: a full burst again, not more
    assert h.sweep()[2] == 3
    assert h.dispatched_rids() == rids[:8]  # FIFO, each once
    assert r.hget(keys.group_key("default", "qs"), "throttled") == "requests_per_second"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_resumed_requests_are_not_charged_again(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=0)
    h.quota("default", requests_per_second=1, burst=1)
    h.add_worker("w", slots=1)
    low = h.submit("a", priority=1)
    h.set_clock(T0 + 1000)
    high = h.submit("b", priority=9)
    h.finish(h.run_of(low))  # release after the preemption: the high request takes the slot
    h.complete(high)
    assert h.status(low) == "running"  # resumed at T0 + 1000 although the rate allows no new request now


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_tokens_per_second_reserve_and_refund(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("default", tokens_per_second=100)  # bucket capacity defaults to one second of tokens
    h.add_worker("w", slots=10)
    r1, r2, r3, r4 = queue(h, 4, max_tokens=40)
    assert h.dispatched_rids() == [r1, r2]
    assert float(qs(h)["lvl"]) == 20
    assert h.sweep()[3] == T0 + 200  # when 40 tokens will be there
    run = h.run_of(r1)
    h.append(run, 10)
    h.finish(run)  # 30 reserved tokens come back, and r3 gets them at once
    assert h.dispatched_rids() == [r1, r2, r3]
    assert float(qs(h)["lvl"]) == 20 + 30 - 40
    assert h.sweep()[3] == T0 + 300
    h.set_clock(T0 + 299)
    assert h.sweep()[2] == 0
    h.set_clock(T0 + 300)
    assert h.sweep()[2] == 1 and h.dispatched_rids()[-1] == r4
    assert float(qs(h)["lvl"]) == 0
    h.cancel(r2)  # a cancelled run refunds what it did not produce
    assert float(qs(h)["lvl"]) == 40


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_run_past_its_max_tokens_resumes_reserving_nothing(r: redis.Redis) -> None:
    """A backend that streams message diffs may send more chunks than max_tokens, each a token event
    (workers/engines/openai.py): its resume has no tokens left to reserve, and must not give the group
    back tokens it never had, nor lower its tenant's charge."""
    h = Harness(r)
    h.quota("default", tokens_per_second=100)
    h.add_worker("w", slots=1)
    rid = h.submit("a", max_tokens=4)
    assert float(qs(h)["lvl"]) == 96
    charged = h.vtc("t")
    run = h.run_of(rid)
    h.append(run, 6)  # 6 token events for a max_tokens of 4
    h.handback(run)  # resumed at once on the slot it gave back
    assert h.status(rid) == "running" and h.run_of(rid).attempt == "2"
    assert float(qs(h)["lvl"]) == 96 and h.vtc("t") >= charged


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_request_larger_than_the_bucket_waits_for_a_full_bucket_then_borrows(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("default", tokens_per_second=100)
    h.add_worker("w", slots=10)
    big, small = queue(h, 2, max_tokens=250)
    assert h.dispatched_rids() == [big]
    assert float(qs(h)["lvl"]) == -150
    assert h.sweep()[3] == T0 + 2500  # back to a full bucket (100) from -150


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_token_quota_is_never_overrun_by_streams(r: redis.Redis) -> None:
    """Random sizes, random early stops, 10 ms steps: tokens streamed by time T never exceed the bucket plus
    tokens_per_second * T, because every run reserves its max_tokens before it starts."""
    h = Harness(r)
    h.quota("default", tokens_per_second=200, burst_tokens=100)
    h.add_worker("w", slots=50)
    rng = random.Random(11)
    produced = 0
    for i in range(200):
        h.submit(f"s{i}", max_tokens=rng.randint(5, 60))
    for step in range(1, 201):
        h.set_clock(T0 + 10 * step)
        for run in list(h.runs):
            want = int(h.r.hget(keys.request(run.rid), "mt") or 0) - run.next_index
            burst = min(want, rng.randint(0, 8))
            if burst:
                h.append(run, burst)
                produced += burst
            if rng.random() < 0.3 or burst == want:
                h.finish(run)
        h.sweep()
        assert produced <= 100 + 200 * (10 * step) / 1000
    assert produced > 0.8 * 200 * 2  # and the quota was used, not starved


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_max_concurrency(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("default", max_concurrency=2)
    h.add_worker("w", slots=5)
    rids = queue(h, 4)
    h.sweep()
    assert h.dispatched_rids() == rids[:2]
    h.complete(rids[0])
    assert h.dispatched_rids() == rids[:3]
    assert r.hget(keys.group_key("default", "qs"), "throttled") == "max_concurrency"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_max_concurrency_counts_a_preempted_run_until_its_worker_lets_go(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=0)
    h.quota("default", max_concurrency=1)
    h.add_worker("w", slots=3)
    low = h.submit("a", priority=1)
    high = h.submit("b", priority=9)
    assert h.status(low) == "preempted"
    h.sweep()
    assert h.status(high) == "queued"  # the preempted run still occupies its slot
    h.finish(h.run_of(low))
    assert h.status(high) == "running"
    assert h.status(low) == "preempted"


def group_state(r: redis.Redis, group: str = "default") -> dict[str, Any]:
    """The group's entry in GET /v1/admin/stats (scheduler.admin.Tuning.group_state), on one server."""

    async def read() -> dict[str, Any]:
        client = AsyncRedis(connection_pool=AsyncConnectionPool(**r.connection_pool.connection_kwargs))
        try:
            return await Tuning(client).group_state(group)
        finally:
            await client.aclose(close_connection_pool=True)

    return asyncio.run(read())


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_stats_report_a_concurrency_throttle_only_while_the_cap_holds_work_back(r: redis.Redis) -> None:
    """The last throttle's reason stays in the group's state; the cap's throttle is over once nothing waits
    for it, or once it is gone."""
    h = Harness(r)
    h.quota("default", max_concurrency=1)
    h.add_worker("w", slots=3)
    first, second = queue(h, 2)
    state = group_state(r)
    assert state["throttled"] and state["last_throttle_reason"] == "max_concurrency"
    h.complete(first)
    assert h.status(second) == "running"
    state = group_state(r)
    assert not state["throttled"] and state["last_throttle_reason"] == "max_concurrency"  # nothing waits
    h.quota("default", max_concurrency=None)
    queue(h, 2, prefix="t")
    state = group_state(r)
    assert state["running"] == 3 and state["quota"] == {} and not state["throttled"]


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_stats_call_a_group_throttled_by_its_quota_not_by_a_preemptions_wait(r: redis.Redis) -> None:
    """A group with no quota whose priority stop waits for its victim's minimum run is not throttled (the
    dashboard said "throttled (quota)" with the wait as its next admission); a rate quota's throttle is,
    with the time it admits next."""
    h = Harness(r)
    h.policy(min_run=3000)
    h.add_worker("w", slots=1)
    low = h.submit("low", priority=2, max_tokens=200)
    h.advance(10)
    high = h.submit("high", priority=9)
    assert h.status(low) == "running" and h.status(high) == "queued"
    *_, wake, _ = h.sweep()
    assert wake == T0 + 3000  # the sweep comes back for the stop then
    state = group_state(r)
    assert state["quota"] == {} and not state["throttled"] and state["next_admission_ms"] is None
    h.quota("default", requests_per_second=1, burst=1)
    h.complete(low)
    h.complete(high)
    queue(h, 2, prefix="q")
    state = group_state(r)
    assert state["throttled"] and state["last_throttle_reason"] == "requests_per_second"
    assert state["next_admission_ms"] is not None and state["next_admission_ms"] > h.now


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_group_out_of_quota_does_not_block_another(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("slow", requests_per_second=1, burst=1, tokens_per_second=10)
    h.add_worker("ws", group="slow", slots=5)
    h.add_worker("wf", group="fast", slots=5)
    slow = queue(h, 4, group="slow", prefix="a")
    fast = queue(h, 4, group="fast", prefix="b")
    h.sweep()
    assert set(h.dispatched_rids()) == {slow[0], *fast}
    h.complete(fast[0])
    more = h.submit("b00", group="fast")
    assert h.status(more) == "running"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_throttled_requests_are_neither_lost_nor_reordered(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("default", requests_per_second=1, burst=1)
    h.add_worker("w", slots=3)
    mine = [h.submit("s", max_tokens=2) for _ in range(4)]
    h.advance(1)
    other = h.submit("u", max_tokens=2)
    for second in range(1, 12):
        for run in list(h.runs):
            h.complete(run.rid)
        h.set_clock(T0 + 1000 * second)
        h.sweep()
    assert sorted(h.dispatched_rids()) == sorted([*mine, other])
    assert [x for x in h.dispatched_rids() if x in mine] == mine
    assert all(h.status(x) == "done" for x in [*mine, other])
    done = [e.rid for e in h.log("s") if e.event == "done"]
    assert done == mine


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_rate_changes_apply_on_the_next_decision(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("default", requests_per_second=1, burst=1)
    h.add_worker("w", slots=20)
    rids = queue(h, 12)
    assert len(h.dispatched) == 1
    h.quota("default", requests_per_second=1000, burst=4)  # raised: no wait for the old interval; the
    assert h.sweep()[2] == 3  # burst of 4 at T0 counts the one already admitted at T0
    h.quota("default", requests_per_second=10, burst=1)  # lowered: the debt is rescaled to the new rate
    h.set_clock(T0 + 3)
    assert h.sweep()[2] == 0
    *_, wake, _ = h.sweep()
    h.set_clock(int(wake))
    assert h.sweep()[2] == 1
    h.quota("default", requests_per_second=None)  # removed: unlimited at once
    assert h.sweep()[2] == 7
    assert h.dispatched_rids() == rids


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_removing_a_token_quota_and_concurrency_cap_makes_the_group_unlimited(r: redis.Redis) -> None:
    h = Harness(r)
    h.quota("default", tokens_per_second=10, max_concurrency=1)
    h.add_worker("w", slots=10)
    queue(h, 5, max_tokens=10)
    assert len(h.dispatched) == 1
    h.quota("default", tokens_per_second=None, max_concurrency=None)
    h.sweep()
    assert len(h.dispatched) == 5


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
@pytest.mark.parametrize(("tat", "ti"), [("nan", "500"), ("-nan", "500"), ("inf", "inf"), ("2000000", "inf")])
def test_a_rate_state_that_is_not_finite_is_taken_as_none(r: redis.Redis, tat: str, ti: str) -> None:
    """A state stored under an infinite interval (a rate of 1e-320, accepted before rates had a floor)
    made every later decision's arithmetic NaN, which admitted every request, even at a sane rate."""
    h = Harness(r)
    h.quota("default", requests_per_second=2, burst=1)
    r.hset(keys.group_key("default", "qs"), mapping={"tat": tat, "ti": ti})
    h.add_worker("w", slots=5)
    queue(h, 3)
    assert len(h.dispatched) == 1  # one at once (burst 1), the others wait their turn
    assert float(qs(h)["tat"]) == T0 + 500


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_rate_stored_below_the_floor_still_limits(r: redis.Redis) -> None:
    """A rate stored before the API refused rates below 1e-6/s (1e-320: an infinite interval) is read as
    the floor: the old scripts' NaN admitted every request."""
    h = Harness(r)
    h.quota("default", requests_per_second=2, burst=1)
    r.hset(keys.group_key("default", "cfg"), "requests_per_second", "1e-320")
    h.add_worker("w", slots=5)
    queue(h, 3)
    assert len(h.dispatched) == 1


@pytest.mark.parametrize("bad", [{"requests_per_second": -1}, {"burst": "many"}, {"requests_per_second": 1e-320},
                                 {"tokens_per_second": 1e-9}])
def test_quota_admin_api(redis_url: str, bad: dict) -> None:
    stack = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)
    try:
        base = stack.base_url
        code, body = call("PUT", f"{base}/v1/admin/groups/g1", {"requests_per_second": 5, "burst": 2,
                                                                 "max_concurrency": 3})
        assert code == 200 and body["quota"] == {"requests_per_second": 5, "burst": 2, "max_concurrency": 3}
        code, body = call("PUT", f"{base}/v1/admin/groups/g1", {"requests_per_second": None})
        assert code == 200 and body["quota"] == {"burst": 2, "max_concurrency": 3}
        code, body = call("GET", f"{base}/v1/admin/groups")
        assert {"group": "g1", "model": None, "quota": {"burst": 2, "max_concurrency": 3},
                "deadlines_ms": {}} in body["groups"]
        code, body = call("PUT", f"{base}/v1/admin/groups/g1", bad)
        assert 400 <= code < 500 and "error" in body
        code, stats = call("GET", f"{base}/v1/admin/stats")
        group = next(g for g in stats["groups"] if g["group"] == "g1")
        assert group["quota"] == {"burst": 2, "max_concurrency": 3}
    finally:
        stack.stop()
