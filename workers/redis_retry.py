"""A worker's Redis writes, resent through dropped connections and a store refusing work for a while
(full, loading, a replica during a failover: sessions/connect.py `store_unavailable`).

Safe because every write a worker makes is fenced: an append names its attempt and first index, and
finish/handback let go of a slot once per attempt, so a resend after a lost reply is recognised
rather than applied twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, wait_exponential

from sluicegate.sessions.connect import store_unavailable
from sluicegate.workers.retrying import first_try_then

log = logging.getLogger(__name__)

T = TypeVar("T")


async def through_dropped_connections(call: Callable[[], Awaitable[T]], *, seconds: float, what: str) -> T:
    """`await call()`, again after a dropped connection or a refusal (waits of 50 ms doubling to 1 s) for
    up to `seconds`; past that the last error is raised."""

    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (%s); retrying", what, error)

    def retrying() -> AsyncRetrying:
        return AsyncRetrying(retry=retry_if_exception(store_unavailable), reraise=True,
                             wait=wait_exponential(multiplier=0.05, max=1.0), stop=stop_after_delay(seconds),
                             before_sleep=warn)

    return await first_try_then(call, retrying, store_unavailable)
