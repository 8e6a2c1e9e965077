"""`first_try_then`: a bare first attempt, and tenacity's policy exactly as if it had run from the start."""

from __future__ import annotations

import asyncio

import pytest
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_none

from sluicegate.workers.retrying import first_try_then


class Flaky:
    def __init__(self, failures: int, error: type[BaseException] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return "ok"


def policy(attempts: int, built: list[int]) -> AsyncRetrying:
    built.append(1)
    return AsyncRetrying(stop=stop_after_attempt(attempts), wait=wait_none(), reraise=True,
                         retry=retry_if_exception_type(ConnectionError))


def run(call: Flaky, attempts: int, built: list[int]) -> str:
    return asyncio.run(first_try_then(call, lambda: policy(attempts, built),
                                      lambda error: isinstance(error, ConnectionError)))


def test_success_at_once_builds_no_retry_loop() -> None:
    built: list[int] = []
    call = Flaky(0)
    assert run(call, 3, built) == "ok" and call.calls == 1 and built == []


def test_the_failed_first_try_counts_as_tenacitys_first_attempt() -> None:
    built: list[int] = []
    call = Flaky(2)
    assert run(call, 3, built) == "ok" and call.calls == 3 and built == [1]
    call = Flaky(3)
    with pytest.raises(ConnectionError, match="failure 3"):
        run(call, 3, [])
    assert call.calls == 3  # three attempts in all, not 1 + 3


def test_an_error_not_retried_is_raised_at_once() -> None:
    built: list[int] = []
    call = Flaky(1, ValueError)
    with pytest.raises(ValueError):
        run(call, 3, built)
    assert call.calls == 1 and built == []
