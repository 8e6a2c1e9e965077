"""Retries that cost nothing until something fails.

tenacity's retry loop costs about as much CPU as the Redis call it wraps, and a worker makes such a
call for every token batch. So the first attempt runs bare; only when it fails with an error worth
retrying does tenacity take over, and it counts that failure as its own first attempt: the same
attempts, waits and logging as if it had run the call from the start. One difference: tenacity's
clock starts at the failure, so a time limit (stop_after_delay) does not count the first attempt's
own duration.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying

T = TypeVar("T")


async def first_try_then(call: Callable[[], Awaitable[T]], retrying: Callable[[], AsyncRetrying],
                         retried: Callable[[BaseException], bool]) -> T:
    """`await call()`; when that raises an error `retried` accepts, hand over to `retrying()` (built only
    then)."""
    try:
        return await call()
    except Exception as error:
        if not retried(error):
            raise
        failed: BaseException | None = error

    async def again() -> T:
        nonlocal failed
        if failed is not None:  # tenacity's first attempt is the one that already failed
            error, failed = failed, None
            raise error
        return await call()

    return await retrying()(again)  # type: ignore[no-any-return]
