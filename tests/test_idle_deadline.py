"""sessions/idle.py: one idle deadline for a whole stream of waits. Only a wait for the next item can
time out; the time between waits never counts; a cancel from anyone else stays a cancel. On the loop
the worker runs (uvloop, whose timers are whole milliseconds) and on asyncio's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop

from sluicegate.sessions.idle import IdleDeadline

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


async def paced(gaps: list[float], closed: list[bool]) -> AsyncIterator[int]:
    """An item after each gap (seconds), noting when the stream is closed."""
    try:
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            yield i
    finally:
        closed.append(True)


async def drain(deadline: IdleDeadline, items: AsyncIterator[int], between: float = 0.0) -> list[int]:
    got: list[int] = []
    try:
        while (item := await deadline.next(items)) is not None:
            got.append(item)
            await asyncio.sleep(between)  # the consumer's own work between two waits
    finally:
        deadline.close()
    return got


def run(loop: str, main: Callable[[], Awaitable[Any]]) -> Any:
    return LOOPS[loop](main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stream_that_keeps_coming_never_times_out(loop: str) -> None:
    """Forty items 10 ms apart: 0.4 s in all, each wait far under the 0.1 s deadline (its one timer is
    moved on, never fired)."""
    async def main() -> list[int]:
        return await drain(IdleDeadline(0.1), paced([0.01] * 40, []))

    assert run(loop, main) == list(range(40))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_wait_past_the_deadline_raises_timeout_and_closes_the_stream(loop: str) -> None:
    closed: list[bool] = []

    async def main() -> tuple[list[int], float]:
        got: list[int] = []
        deadline = IdleDeadline(0.1)
        items = paced([0.0, 0.01, 5.0], closed)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            while (item := await deadline.next(items)) is not None:
                got.append(item)
        deadline.close()
        return got, asyncio.get_running_loop().time() - started

    got, took = run(loop, main)
    assert got == [0, 1] and closed == [True]
    assert 0.09 <= took < 1.0  # the deadline, not the 5 s gap


@pytest.mark.parametrize("loop", LOOPS)
def test_the_consumers_time_between_waits_never_counts(loop: str) -> None:
    """Items come at once, the consumer takes 0.15 s over each: longer than the 0.1 s deadline, which
    only a wait can run out."""
    async def main() -> list[int]:
        return await drain(IdleDeadline(0.1), paced([0.0] * 4, []), between=0.15)

    assert run(loop, main) == [0, 1, 2, 3]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_cancel_from_outside_stays_a_cancel(loop: str) -> None:
    """A run stopped by a notice while it waits for a token is cancelled, not timed out, and the deadline
    leaves no timer behind to cancel anything later."""
    async def main() -> str:
        task = asyncio.create_task(drain(IdleDeadline(0.1), paced([5.0], [])))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            outcome = "cancelled"
        except TimeoutError:
            outcome = "timed out"
        await asyncio.sleep(0.2)  # past the deadline: this task is not cancelled by a stale timer
        return outcome

    assert run(loop, main) == "cancelled"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_task_with_an_old_cancel_still_times_out(loop: str) -> None:
    """A task that once swallowed a cancel without withdrawing it (cancelling() stays 1) still gets a
    TimeoutError, not a CancelledError, when its own deadline fires: asyncio.timeout's rule."""
    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.sleep(1)
        assert task.cancelling() == 1
        deadline = IdleDeadline(0.05)
        with pytest.raises(TimeoutError):
            await drain(deadline, paced([1.0], []))
        return task.cancelling()

    assert run(loop, main) == 1  # the old one stays; ours is withdrawn


async def swallowing(first_gap: float) -> AsyncIterator[int]:
    """A stream that turns a cancel of its wait into one more item (as a careless iterator might)."""
    try:
        await asyncio.sleep(first_gap)
    except asyncio.CancelledError:
        yield -1
    yield 0


@pytest.mark.parametrize("loop", LOOPS)
def test_a_fire_the_iterator_swallowed_is_withdrawn(loop: str) -> None:
    """The deadline fires, but the iterator turns the cancel into an item: the cancel it asked is
    withdrawn (the task is not left cancelling) and a later cancel from outside is not taken for ours."""
    async def main() -> tuple[list[int], int]:
        deadline = IdleDeadline(0.05)
        items = swallowing(1.0)
        got = [await deadline.next(items), await deadline.next(items)]
        deadline.close()
        task = asyncio.current_task()
        assert task is not None
        return got, task.cancelling()

    assert run(loop, main) == ([-1, 0], 0)


@pytest.mark.parametrize("loop", LOOPS)
def test_waits_on_a_queue_time_out_alone_and_leave_it_whole(loop: str) -> None:
    """`wait`, as an event stream waits for its next batch: quick puts never time out; a wait with nothing
    put raises TimeoutError and its cancelled get takes nothing, so the next put reaches the next wait."""
    async def main() -> tuple[list[int], bool, int]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        deadline = IdleDeadline(0.1)

        async def put_later(n: int, after: float) -> None:
            await asyncio.sleep(after)
            queue.put_nowait(n)

        got = []
        for n in range(20):  # 20 waits of ~20 ms: 400 ms in all, none alone near the deadline
            later = asyncio.create_task(put_later(n, 0.02))
            got.append(await deadline.wait(queue.get()))
            await later
        try:
            await deadline.wait(queue.get())
            timed_out = False
        except TimeoutError:
            timed_out = True
        queue.put_nowait(99)
        last = await deadline.wait(queue.get())
        deadline.close()
        return got, timed_out, last

    assert run(loop, main) == (list(range(20)), True, 99)
