"""One idle deadline for a whole token stream.

A timeout around each wait for the backend's next chunk (`asyncio.timeout`) made, moved and cancelled a
timer for every token: about 5% of the worker's samples under load (py-spy, 16-token answers). This arms one
timer per idle period instead, and a token costs a clock read. As before, only a wait can time out: the
time between two waits (the run writing its token, while the stream is suspended at its yield) never
counts, and a cancel from anyone else stays a cancel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")
EARLY = 0.001  # seconds a timer may fire before its time (uvloop's timers are whole milliseconds)


class IdleDeadline:
    """`next(items)` raises TimeoutError when that wait alone lasts `seconds`. Made and used in one task."""

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
        self._waiting_since = since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(since + self.seconds, self._check)
        before = self._task.cancelling()  # cancels asked before this wait (theirs, not ours)
        try:
            return await anext(items, None)
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
