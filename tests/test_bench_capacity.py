"""The scheduler benches' capacity (loadtest/scenarios/live.py `capacity`) is the sim engine's own pace: a run of n
tokens lasts the prefill plus n - 1 token intervals (the first token comes right after the prefill), so the
"2x overload" of `bench deadlines` and the "3x" of `bench fairness` are what they say. The engine's run is timed on
a virtual clock (no sleeping, no timing on this host)."""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

import pytest

from sluicegate.loadtest.scenarios.live import MIN_RUN_SECONDS, capacity
from sluicegate.workers.engines.sim import paced_tokens

pytestmark = pytest.mark.single_server  # no Redis: once is enough


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to its next timer instead of waiting for it."""

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self.now = 0.0
        select = self._selector.select  # type: ignore[attr-defined]

        def jump(timeout: float | None = None) -> list[Any]:
            if timeout:
                self.now += timeout
            return select(0)

        self._selector.select = jump  # type: ignore[attr-defined]

    def time(self) -> float:
        return self.now


def paced_run_seconds(max_tokens: int, tokens_per_second: float, prefill_ms: float) -> float:
    """How long the sim engine takes to send `max_tokens` tokens, on the virtual clock."""
    async def run() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        sent = [t async for t in paced_tokens(b"seed", 0, max_tokens, tokens_per_second=tokens_per_second,
                                                prefill_ms=prefill_ms)]
        assert len(sent) == max_tokens
        return loop.time() - began

    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


@pytest.mark.parametrize(("max_tokens", "tokens_per_second", "prefill_ms", "slots"), [
    (10, 25.0, 20.0, 24),  # bench deadlines' defaults: 0.38 s a run
    (100, 100.0, 20.0, 16),  # bench fairness'
    (10, 50.0, 20.0, 16),  # bench priority's short jobs
    (3, 10.0, 0.0, 4),
])
def test_capacity_is_slots_over_the_sim_engines_own_run(max_tokens: int, tokens_per_second: float,
                                                         prefill_ms: float, slots: int) -> None:
    run = paced_run_seconds(max_tokens, tokens_per_second, prefill_ms)
    assert run == pytest.approx(prefill_ms / 1000 + (max_tokens - 1) / tokens_per_second, abs=1e-9)
    assert capacity(slots, max_tokens, tokens_per_second, prefill_ms) == pytest.approx(slots / run, rel=1e-9)


def test_the_deadlines_benchs_stated_figures() -> None:
    """Its docstring (and the README's deadlines row): 0.38 s a run, ~63 requests/s with 2 x 12 slots."""
    assert paced_run_seconds(10, 25.0, 20.0) == pytest.approx(0.38)
    assert round(capacity(24, 10, 25.0, 20.0)) == 63


def test_a_run_the_engine_ends_at_once_has_a_finite_capacity() -> None:
    """1 token, no prefill: the run takes no engine time (was a ZeroDivisionError: `bench fairness --max-tokens 1
    --prefill-ms 0` died in its traceback)."""
    assert paced_run_seconds(1, 25.0, 0.0) == pytest.approx(0.0, abs=1e-9)
    assert capacity(24, 1, 25.0, 0.0) == pytest.approx(24 / MIN_RUN_SECONDS)
