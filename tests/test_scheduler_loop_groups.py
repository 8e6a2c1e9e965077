"""A group the scheduler cannot work with (its slot unreachable, or refusing) holds back no other group: the
scheduler still starts, every other group gets its loop (lease sweeps, aging, quota wakes), and the failing
group's loop copies the policy again until it succeeds, then sweeps (scheduler/loop.py, scheduler/policy.py).
Here the group's slot refuses the policy's copy (its `pol` key holds a string: WRONGTYPE), a failure a real
server gives without a master having to go down under the shared test cluster."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from sluicegate.scheduler.loop import Scheduler
from sluicegate.sessions import keys
from tests.helpers import fast_settings
from tests.test_throttled_sweep import real_clock_harness


async def until(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


def test_a_group_whose_policy_cannot_be_copied_holds_back_no_other_group(r: redis.Redis, redis_url: str) -> None:
    h = real_clock_harness(r)
    h.submit("s-a", group="a")  # "a" sorts first: the groups are taken in that order
    h.submit("s-b", group="b")
    broken = keys.group_key("a", "pol")
    r.delete(broken)
    r.set(broken, "not a hash")  # the copy's HSET fails, as an unreachable master's would
    scheduler = Scheduler(fast_settings(redis_url, sweep_seconds=0.1))
    swept: Counter[str] = Counter()
    sweep = scheduler.transitions.sweep

    async def counted(group: str) -> Any:
        result = await sweep(group)
        swept[group] += 1
        return result

    scheduler.transitions.sweep = counted  # type: ignore[method-assign]
    seen: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(scheduler.run(stop))
        try:
            await until(lambda: swept["b"] >= 2 or task.done(), 10)
            seen["ended"] = task.exception() if task.done() else None
            seen["before"] = dict(swept)
            r.delete(broken)  # the group can be reached again
            await until(lambda: swept["a"] >= 1 or task.done(), 10)
            seen["after"] = dict(swept)
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert seen["ended"] is None, f"the scheduler did not start: {seen['ended']!r}"
    assert seen["before"].get("b", 0) >= 2 and seen["before"].get("a", 0) == 0, seen
    assert seen["after"].get("a", 0) >= 1, f"group a's loop never retried: {seen}"
    assert r.type(broken) == "hash"  # its policy copied at last
