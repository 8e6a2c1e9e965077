"""A group held back by its quota sleeps until the quota admits work, event-driven (DESIGN.md): its scheduler
loop wakes at the wake-up the sweep returns, or when a later call needs it sooner, and does not sweep in a
busy loop. The sweep's own dispatch notes the wake-up it returns; the hint that note leaves for the loop
must not end the loop's next wait at once (scheduler/lua/sweep.lua, note_wake in quotas.lua)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from sluicegate.scheduler.admin import Tuning
from sluicegate.scheduler.loop import Scheduler
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from tests.helpers import ON_CLUSTER, fast_settings
from tests.sched_harness import Harness

MAX_SWEEPS = 20  # a sleeping loop sweeps a few times here; a spinning one, thousands of times


def real_clock_harness(r: redis.Redis) -> Harness:
    """The harness on the servers' own clock, which the real scheduler's sweeps read."""
    h = Harness(r, cluster=ON_CLUSTER)
    if not ON_CLUSTER:
        r.delete(keys.PREFIX + "clock")
    return h


def set_quota(redis_url: str, **fields: float) -> None:
    """Through the admin API's code path, on either form (the harness's quota() takes one server only)."""

    async def set_it() -> None:
        client = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            await Tuning(client).set_quota("default", dict(fields))
        finally:
            await client.aclose()

    asyncio.run(set_it())


def run_scheduler(redis_url: str, sweep_seconds: float, body: Callable[[], Awaitable[None]],
                  starts: list[tuple[float, int]] | None = None) -> int:
    """Run a real scheduler while `body` runs; returns how many sweeps of group "default" it made, and notes
    in `starts` each of those sweeps' time (monotonic) and how many runs it started."""
    scheduler = Scheduler(fast_settings(redis_url, sweep_seconds=sweep_seconds))
    sweeps = 0
    sweep = scheduler.transitions.sweep

    async def counted(group: str) -> Any:
        nonlocal sweeps
        result = await sweep(group)
        if group == "default":
            sweeps += 1
            if starts is not None:
                starts.append((time.monotonic(), result.started))
        return result

    scheduler.transitions.sweep = counted  # type: ignore[method-assign]

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(scheduler.run(stop))
        try:
            await body()
        finally:
            stop.set()
            await task

    asyncio.run(main())
    return sweeps


def test_a_throttled_group_sleeps_until_its_quota_admits_work(r: redis.Redis, redis_url: str) -> None:
    h = real_clock_harness(r)
    set_quota(redis_url, requests_per_second=0.2)  # one start per 5 s
    h.add_worker("w", slots=4)
    for i in range(4):
        h.submit(f"s{i}")
    assert len(h.running()) == 1
    throttled = keys.group_key("default", "m")
    before = int(r.hget(throttled, "throttled|default|requests_per_second") or 0)

    sweeps = run_scheduler(redis_url, 0.5, lambda: asyncio.sleep(2.0))

    assert sweeps < MAX_SWEEPS  # about one per sweep_seconds
    assert int(r.hget(throttled, "throttled|default|requests_per_second") or 0) - before < MAX_SWEEPS
    assert len(h.running()) == 1  # and the quota held


def test_the_loop_wakes_when_the_quota_admits_work_and_for_a_submit_between_sweeps(
        r: redis.Redis, redis_url: str) -> None:
    """The sweeps come 30 s apart: every start after the first is the loop's wake-up, at the time a sweep
    returned, after a submit woke it (the quota held that submit's request back: a hint that survives)."""
    h = real_clock_harness(r)
    set_quota(redis_url, requests_per_second=2)
    h.add_worker("w", slots=4)
    started: list[int] = []

    async def body() -> None:
        await asyncio.sleep(0.3)  # the loop has swept (nothing to do) and sleeps
        for i in range(3):
            h.submit(f"s{i}")
        started.append(len(h.running()))
        deadline = time.monotonic() + 10
        while len(h.running()) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        started.append(len(h.running()))

    sweeps = run_scheduler(redis_url, 30.0, body)

    assert started == [1, 3]  # one at once, two more as the rate allows (0.5 s apart), long before 30 s
    assert sweeps < MAX_SWEEPS


def test_a_requests_per_second_quota_admits_at_its_rate_between_sweeps(r: redis.Redis, redis_url: str) -> None:
    """Every start here is the loop's own wake-up (sweeps 30 s apart, nothing else calls). Timed by the server's
    BLPOP timeout, each wake came at the server's next `hz` tick (100 ms on an idle Valkey): 20 a second gave
    about 10 (DESIGN: the rate within [0.97, 1.01] x the quota; 0.8 here leaves room for a loaded machine)."""
    h = real_clock_harness(r)
    set_quota(redis_url, requests_per_second=20, burst=1)
    h.add_worker("w", slots=200)
    for i in range(150):
        h.submit(f"s{i}")
    starts: list[tuple[float, int]] = []

    async def body() -> None:
        for _ in range(6):  # the worker takes its runs and renews their leases (1.5 s here), as a live one does:
            await asyncio.sleep(0.5)  # a lapsed one would be handed back and start again, uncharged
            h.collect()
            h.heartbeat("w")

    begun = time.monotonic()
    run_scheduler(redis_url, 30.0, body, starts)
    measured = [n for at, n in starts if begun + 0.5 <= at < begun + 3.0]  # 2.5 s of the loop's own wakes
    assert sum(measured) / 2.5 >= 0.8 * 20, starts  # [about 10 a second before]
    assert sum(measured) <= 20 * 2.5 + 1, starts  # and never past the quota (a start at each end of the window)
