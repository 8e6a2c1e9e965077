"""One idle deadline for a whole stream of waits.

A timeout around each wait (`asyncio.timeout`) made, moved and cancelled a timer for every one: about 5%
of the worker's samples under load around each wait for the backend's next chunk (py-spy, 16-token
answers), and 5% of the API's around each wait of a stream for its next batch of events. This arms one
timer per idle period instead, and a wait costs a clock read. As before, only a wait can time out: the
time between two waits (the caller handling what it got) never counts, and a cancel from anyone else
stays a cancel. Used by the engines' backend streams (workers/engines/openai.py) and the API's event
streams (sessions/stream.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

T = TypeVar("T")
EARLY = 0.001  # seconds a timer may fire before its time (uvloop's timers are whole milliseconds)


class IdleDeadline:
    """`wait(x)` (and `next(items)`) raises TimeoutError when that wait alone lasts `seconds`. Made and used in
    one task."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "an IdleDeadline is made inside the task that waits"
        self._task = task
        self._waiting_since: float | None = None  # None between waits
        self._timer: asyncio.TimerHandle | None = None
        self._fired = False

    async def next(self, items: AsyncIterator[T]) -> T | None:
        """The next item, None at the end."""
        return await self.wait(anext(items, None))

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result; TimeoutError when it takes `seconds` (it is cancelled then)."""
        self._waiting_since = since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(since + self.seconds, self._check)
        before = self._task.cancelling()  # cancels asked before this wait (theirs, not ours)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._fired:  # ours, unless someone else cancelled too (then theirs goes on)
                self._fired = False
                if self._task.uncancel() <= before:
                    raise TimeoutError(f"no item for {self.seconds:g} s") from None
            raise
        finally:
            self._waiting_since = None
            if self._fired:  # fired, but the wait ended otherwise (the iterator turned the cancel into an
                self._fired = False  # item or another error): the cancel asked is withdrawn
                self._task.uncancel()

    def _check(self) -> None:
        """The timer: cancel the wait that has lasted `seconds`, else wait for the current one's due time.
        It runs while the task is suspended, so a wait in progress is suspended inside `next`, where the
        cancel lands."""
        self._timer = None
        since = self._waiting_since
        if since is None:  # between waits: the next wait arms it again
            return
        due = since + self.seconds
        if self._loop.time() >= due - EARLY:
            self._fired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
