"""A worker's Redis writes, resent through dropped connections.

Safe because every write a worker makes is fenced: an append names its attempt and first index, and
finish/handback let go of a slot once per attempt, so a resend after a lost reply is recognised
rather than applied twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay, wait_exponential

from sluicegate.sessions.connect import UNAVAILABLE
from sluicegate.workers.retrying import first_try_then

log = logging.getLogger(__name__)

REDIS_DOWN = UNAVAILABLE  # connection lost, timed out, or a cluster node or slot unavailable
T = TypeVar("T")


async def through_dropped_connections(call: Callable[[], Awaitable[T]], *, seconds: float, what: str) -> T:
    """`await call()`, again after a dropped connection (waits of 50 ms doubling to 1 s) for up to
    `seconds`; past that the last connection error is raised."""

    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (%s); retrying", what, error)

    def retrying() -> AsyncRetrying:
        return AsyncRetrying(retry=retry_if_exception_type(REDIS_DOWN), reraise=True,
                             wait=wait_exponential(multiplier=0.05, max=1.0), stop=stop_after_delay(seconds),
                             before_sleep=warn)

    return await first_try_then(call, retrying, REDIS_DOWN)
