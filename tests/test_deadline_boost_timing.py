"""When a deadline's boost comes, and what it raises. A request readied with a deadline wakes its group's
scheduler loop for its boost (or its "fail") when that is due before the loop's next wake-up, instead of
waiting for the periodic sweep (fairness.lua make_ready, note_deadline_wake; DESIGN, scheduling policy 8).
The sweep raises only a request still on time (a late one would run ahead of the class it is raised into),
and the raised request's aging clock keeps running (scheduler/lua/sweep.lua)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis

from sluicegate.scheduler.loop import Scheduler
from sluicegate.sessions import keys
from tests.helpers import fast_settings
from tests.sched_harness import Harness
from tests.test_throttled_sweep import real_clock_harness

SINGLE = pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
LONG_SWEEP = 30.0  # the periodic sweep: none comes while a test waits


def in_class(r: redis.Redis, sid: str, tenant: str, cls: int) -> bool:
    """Whether the session waits in class `cls` on the control plane (on a cluster the request hash shows a
    promotion only once a scheduler wrote it)."""
    return r.zscore(keys.group_key("default", f"c{cls}:{tenant}"), sid) is not None


def with_a_scheduler(redis_url: str, body: Callable[[], Awaitable[None]], **settings: float) -> None:
    """Run a real scheduler (its policy from `settings`, which it publishes at its start) while `body` runs."""
    scheduler = Scheduler(fast_settings(redis_url, sweep_seconds=LONG_SWEEP, **settings))

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(scheduler.run(stop))
        try:
            await asyncio.sleep(0.5)  # it has swept, and sleeps: nothing is due for LONG_SWEEP
            assert not task.done(), task
            await body()
        finally:
            stop.set()
            await task

    asyncio.run(main())


async def until(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


def test_a_deadline_submitted_while_the_loop_sleeps_is_boosted_without_waiting_for_the_sweep(
        r: redis.Redis, redis_url: str) -> None:
    h = real_clock_harness(r)
    h.add_worker("w1", slots=1)
    h.submit("blocker", tenant="other", max_tokens=1000)
    h.submit("s-high", tenant="x", priority=7)  # the highest class with work: a boost may reach 6
    boosted: list[bool] = []

    async def body() -> None:
        # its slack runs out 0.5 s from now; the loop's next periodic sweep is LONG_SWEEP away
        h.submit("s-urgent", tenant="t", priority=5, deadline_ms=1000)
        boosted.append(await until(lambda: in_class(r, "s-urgent", "t", 6), 10))

    with_a_scheduler(redis_url, body, max_preemptions=0, deadline_promote_window=0.5, deadline_max_boost=1)
    assert boosted == [True], "the boost waited for the periodic sweep"


@pytest.mark.parametrize("session", ["s-doomed", "s-one"], ids=["readied", "behind-its-sessions-head"])
def test_a_fail_deadline_submitted_while_the_loop_sleeps_ends_without_waiting_for_the_sweep(
        r: redis.Redis, redis_url: str, session: str) -> None:
    """No boost (dlb 0): only its "fail" at the deadline needs the loop. A request readied wakes it (make_ready);
    one behind its session's running head is not readied but noted in the group's dlq, which wakes it too
    (submit_one.lua; on a cluster note_behind.lua)."""
    h = real_clock_harness(r)
    h.add_worker("w1", slots=1)
    h.submit("s-one", tenant="t", max_tokens=1000)  # running: s-one's head, and the group's one slot
    ended: list[str] = []

    async def body() -> None:
        rid = h.submit(session, tenant="t", priority=5, deadline_ms=500, fail_on_miss=True)
        await until(lambda: h.status(rid) != "queued", 10)
        ended.append(h.status(rid))

    with_a_scheduler(redis_url, body, max_preemptions=0, deadline_max_boost=0)
    assert ended == ["failed"], f"still {ended} past its deadline: the fail waited for the periodic sweep"


def test_a_deadline_due_after_the_loops_wake_up_does_not_hint_it(r: redis.Redis) -> None:
    """The loop wakes by the wake-up its last sweep noted: a deadline due later needs no sweep of its own."""
    h = real_clock_harness(r)
    h.policy(max_pre=0, dlw=100, dlb=1)
    h.add_worker("w1", slots=1)
    h.submit("blocker", tenant="other", max_tokens=1000)
    h.submit("s-high", tenant="x", priority=7)
    h.submit("s-soon", tenant="t", priority=5, deadline_ms=60_000)
    hint = keys.group_key("default", "hint")
    wake = h.sweep()[3]
    assert r.llen(hint) == 0  # s-soon's boost: the wake-up the sweep returned, and noted
    assert float(r.hget(keys.group_key("default", "qs"), "wake")) == pytest.approx(wake, abs=1)
    h.submit("s-later", tenant="u", priority=5, deadline_ms=120_000)
    assert r.llen(hint) == 0
    h.submit("s-sooner", tenant="v", priority=5, deadline_ms=30_000)
    assert r.llen(hint) == 1  # due before the loop's wake-up: the loop sweeps at once, and sleeps until it


def test_a_request_whose_deadline_already_passed_is_not_boosted(r: redis.Redis) -> None:
    """A sweep that comes only after the deadline (the loop was late, or busy) leaves the request in its class:
    raised, it would run ahead of other tenants' on-time work there. On the servers' own clock: the sleep
    makes sure the deadline has passed."""
    h = real_clock_harness(r)
    h.policy(max_pre=0, dlw=100, dlb=1)
    h.add_worker("w1", slots=1)
    h.submit("blocker", tenant="other", max_tokens=1000)
    h.submit("s-high", tenant="x", priority=7)
    late = h.submit("s-late", tenant="t", priority=5, deadline_ms=150)
    time.sleep(0.3)
    assert h.sweep()[1] == 0
    assert in_class(r, "s-late", "t", 5) and not in_class(r, "s-late", "t", 6)
    assert h.req(late).get("ep", "5") == "5"


@SINGLE
def test_a_request_forecast_to_miss_is_not_boosted(r: redis.Redis) -> None:
    """Nor is one whose deadline is forecast, by the time its slack runs out, to pass before its turn comes
    (fairness.lua forecast_miss): a request of a tenant with nothing ahead of it is."""
    h = Harness(r)
    h.policy(max_pre=0, dlw=1000, dlb=1, dlf=1, dlh=0)  # dlh 0: work without a deadline ranks as it came
    h.add_worker("w1", slots=1)
    h.submit("warm", tenant="t")
    h.advance(1000)
    h.complete(h.runs[0].rid)  # the group's mean run duration is now 1000 ms
    h.submit("blocker", tenant="t", max_tokens=1000)  # t runs one request: 1 s a turn
    h.submit("s-high", tenant="x", priority=7)  # the highest class with work: a boost may reach 6
    for k in range(2):
        h.submit(f"s-ahead{k}", tenant="t", priority=5)  # no deadline, ranked ahead of what comes next
    late = h.submit("s-late", tenant="t", priority=5, deadline_ms=2500)  # 2 s of t's work ahead: on time
    on_time = h.submit("s-on-time", tenant="u", priority=5, deadline_ms=2500)
    assert r.zscore(keys.group_key("default", "dlp"), "s-late") == h.now + 1500  # noted as on time
    h.advance(1500)  # its slack runs out, and the 2 s ahead of it no longer fit before its deadline
    assert h.sweep()[1] == 1
    assert h.req(late).get("ep", "5") == "5"
    assert h.req(on_time)["ep"] == "6"


@SINGLE
def test_a_deadline_boost_keeps_the_aging_clock(r: redis.Redis) -> None:
    """A boost must not restart the wait aging bounds: raised just before its class's max wait, the request
    is aged with a request of its class that has no deadline, not a whole max wait of the new class later."""
    h = Harness(r)
    h.policy(max_pre=0, dlw=100, dlb=1, mw3=10, mw4=10, mw7=10)
    h.add_worker("w1", slots=1)
    h.submit("blocker", tenant="other", max_tokens=1000)
    h.submit("s-high", tenant="x", priority=7)
    with_deadline = h.submit("s-dl", tenant="t", priority=3, deadline_ms=10_000)
    plain = h.submit("s-plain", tenant="u", priority=3)
    h.advance(9_901)
    h.sweep()
    assert h.req(with_deadline)["ep"] == "4"  # boosted
    h.advance(200)  # 10.1 s waited: both past class 3's max wait, and class 4's
    h.sweep()
    assert h.req(plain)["ep"] == "10"
    assert h.req(with_deadline)["ep"] == "10"
