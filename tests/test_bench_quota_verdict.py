"""`bench quota`'s verdict (loadtest/scenarios/quota.py): the requests/s rate is every dispatch inside the
measured window over the window's length, so a stall at either end of it is a miss, not left out."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

from sluicegate.loadtest.scenarios import quota
from sluicegate.loadtest.scenarios.live import Submitted

RATE = 20.0  # the requests/s quota


def starts(until: float) -> list[float]:
    """Dispatch times at exactly the quota from t=0 to `until`, then none (e.g. the workers died)."""
    return [i / RATE for i in range(int(until * RATE) + 1)]


def test_the_rate_is_dispatches_in_the_window_over_its_length() -> None:
    assert quota.dispatch_rate(starts(40.0), 5.0, 35.0) == pytest.approx(RATE)
    assert quota.dispatch_rate(starts(20.0), 5.0, 35.0) == pytest.approx(RATE / 2, rel=0.01)  # stalled at the end
    late = [t + 20.0 for t in starts(20.0)]  # nothing until t=20, then at quota
    assert quota.dispatch_rate(late, 5.0, 35.0) == pytest.approx(RATE / 2, rel=0.01)  # stalled at the start


def test_the_verdict_needs_the_ratio_and_a_backlog() -> None:
    assert quota.quota_ok(RATE, RATE, queued_at_end=300)
    assert not quota.quota_ok(RATE / 2, RATE, queued_at_end=300)
    assert not quota.quota_ok(RATE, RATE, queued_at_end=0)  # not backlogged: the quota did not bind


def test_a_group_that_stopped_dispatching_half_way_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's case through `measure` (server, client and HTTP replaced by their data): quota-rate
    dispatches for 15 s of the 30 s window [5, 35], then none. The old (n - 1) / (last - first) read 1.0x."""
    views = {}
    for i in range(int(1.5 * RATE * 36)):  # offered at 1.5x the quota
        start = i / RATE if i / RATE <= 20.0 else None
        views[f"r{i}"] = {"submitted_at": 1000.0 + i / (1.5 * RATE),
                          "started_at": None if start is None else 1000.0 + start}

    class Serve:
        base_url = "http://unused"

        def __init__(self, flags: list[str]) -> None:
            pass

        def start(self) -> Serve:
            return self

        def stop(self) -> None:
            pass

    class Loop:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.errors: list[str] = []

        async def run(self, started: float) -> list[Submitted]:
            return [Submitted(rid, 0.0) for rid in views]

    class Session:
        async def __aenter__(self) -> Session:
            return self

        async def __aexit__(self, *exc: object) -> None:
            pass

    async def stats(*args: Any) -> dict[str, Any]:
        return {"queued": 300, "groups": [{"group": "default", "throttled": True}]}

    async def fetched(*args: Any) -> dict[str, Any]:
        return views

    async def polled(*args: Any, **kwargs: Any) -> list[tuple[float, dict[str, float]]]:
        return [(float(t), {"default": 10.0 * RATE * min(t, 20)}) for t in range(37)]

    async def noop(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}

    for name, value in (("ServeProcess", Serve), ("OpenLoop", Loop), ("put", noop), ("get_json", stats),
                        ("fetch_views", fetched), ("poll_tokens", polled), ("client_session", lambda n: Session())):
        monkeypatch.setattr(quota, name, value)
    args = argparse.Namespace(workers=2, slots=16, tokens_per_second=200.0, serve_flag=[], warmup=5.0, seconds=30.0,
                              seed=3)
    row = asyncio.run(quota.measure(args, "requests_per_second", {"requests_per_second": RATE, "burst": 1},
                                    1.5 * RATE, 10))
    assert row["ratio"] == pytest.approx(0.5, abs=0.01)
    assert row["ok"] is False
