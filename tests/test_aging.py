"""Aging: a request waiting longer than its class's max wait is promoted to class 10 (ahead of everything,
but it never preempts), so nothing waits forever under sustained high-priority load."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from sluicegate.scheduler.policy import publish_policy
from sluicegate.settings import Settings
from tests.sched_harness import T0, Harness


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_sweep_promotes_after_the_class_max_wait_and_never_preempts(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(mw2=5)
    h.add_worker("w", slots=1)
    busy = h.submit("busy", priority=9)
    low = h.submit("low", priority=2)
    highs = []
    for i in range(3):
        h.advance(1)
        highs.append(h.submit(f"h{i}", priority=9))
    h.set_clock(T0 + 4999)
    assert h.sweep()[1] == 0 and h.req(low)["ep"] == "2"
    h.set_clock(T0 + 5000)
    assert h.sweep()[1] == 1 and h.req(low)["ep"] == "10" and h.req(low)["p"] == "2"
    assert h.status(busy) == "running"  # promoted requests jump the queue but preempt nothing
    h.complete(busy)
    assert h.dispatched_rids() == [busy, low]
    for rid in [low, *highs]:
        h.complete(rid)
    assert h.dispatched_rids() == [busy, low, *highs]


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_nothing_waits_forever_under_sustained_high_load(r: redis.Redis) -> None:
    """One slot, a class 9 request always waiting and each run taking 1 s: the class 0 request (default
    max wait 60 s) starts within its max wait plus one run."""
    h = Harness(r)
    h.add_worker("w", slots=1)
    h.submit("h-first", priority=9)
    victim = h.submit("low", priority=0)
    n = 0
    while victim not in h.dispatched_rids():
        n += 1
        assert n < 200, "the class 0 request never ran"
        h.submit(f"h{n}", priority=9)
        h.advance(1000)
        h.sweep()
        h.complete(h.runs[0].rid)
    started = float(h.req(victim)["sa"])
    assert T0 + 60_000 <= started <= T0 + 61_000


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_class_max_wait_setting_reaches_the_scripts(r: redis.Redis, redis_url: str) -> None:
    """--class-max-wait overrides --max-wait-seconds per class, through the published sg:policy."""
    settings = Settings(redis_url=redis_url, max_wait_seconds=30, class_max_wait="2=5,7=1")

    async def publish() -> None:
        client = AsyncRedis.from_url(redis_url)
        await publish_policy(client, settings)
        await client.aclose()

    asyncio.run(publish())
    h = Harness(r)
    h.add_worker("w", slots=1)
    h.submit("busy", priority=9)
    h.submit("next", priority=9)  # waits in class 9: every class below it is starved by a higher one
    seven, two, five = h.submit("a", priority=7), h.submit("b", priority=2), h.submit("c", priority=5)
    for at, promoted in [(999, []), (1000, [seven]), (4999, [seven]), (5000, [seven, two]),
                         (29_999, [seven, two]), (30_000, [seven, two, five])]:
        h.set_clock(T0 + at)
        h.sweep()
        assert [x for x in (seven, two, five) if h.req(x)["ep"] == "10"] == promoted, at


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_promotion_keeps_the_tenants_counter(r: redis.Redis) -> None:
    """Aging moves a session to class 10; its tenant is still backlogged, not a newcomer to lift."""
    h = Harness(r)
    h.policy(mw2=5)
    h.add_worker("w", slots=1)
    x = h.submit("x", tenant="x", priority=9)
    t = h.submit("t", tenant="t", priority=2)
    h.submit("u1", tenant="u", priority=9)
    h.complete(x)  # u runs and its counter passes t's
    h.submit("u2", tenant="u", priority=9)
    before = h.vtc("t")
    assert h.vtc("u") > before
    h.advance(5000)
    assert h.sweep()[1] == 1
    assert h.vtc("t") == before and h.req(t)["ep"] == "10"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_top_class_is_not_aged(r: redis.Redis) -> None:
    """Aging bounds the wait higher classes impose: the highest class with ready work is left to fair
    share (promoting it would let the longest waiters, the lowest-weight tenants, jump the fair order)."""
    h = Harness(r)
    h.policy(mw3=1)
    h.add_worker("w", slots=1)
    h.submit("busy", priority=9)  # runs; nothing above class 3 waits
    old = h.submit("old", priority=3)
    h.advance(5000)
    assert h.sweep()[1] == 0 and h.req(old)["ep"] == "3"
    h.submit("higher", priority=5)  # now class 3 is starved by a higher class: promoted at once
    assert h.sweep()[1] == 1 and h.req(old)["ep"] == "10"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_aged_requests_are_served_fairly_and_in_order(r: redis.Redis) -> None:
    """Class 10 is an ordinary class for dispatch: least counter first, FIFO inside a tenant."""
    h = Harness(r)
    h.policy(mw3=1)
    h.add_worker("w", slots=1)
    busy = h.submit("busy", tenant="z", priority=9)
    starver = h.submit("next", tenant="z", priority=9)  # a waiting higher class: class 3 is starved
    waiting = []
    for i in range(3):
        for tenant in ("a", "b"):
            h.advance(1)
            waiting.append(h.submit(f"{tenant}{i}", tenant=tenant, priority=3))
    h.advance(1000)
    assert h.sweep()[1] == 6
    h.complete(busy)
    while h.runs:
        h.complete(h.runs[0].rid)
    order = h.dispatched_rids()[1:]
    assert order == [*waiting, starver]  # a0 b0 a1 b1 a2 b2 (alternating, FIFO each), then class 9
