"""The `priority` benchmark's verdict (loadtest/scenarios/priority.py): a high-priority request that never
started or never streamed at overload is a miss, not a sample left out of the p99."""

from __future__ import annotations

import pytest

from sluicegate.loadtest.scenarios.priority import high_verdict

pytestmark = pytest.mark.single_server  # no Redis: once is enough


def row(ttft_p99_ms: float, not_started: int = 0, no_first_token: int = 0) -> dict[str, float]:
    return {"ttft_p99_ms": ttft_p99_ms, "not_started": not_started, "no_first_token": no_first_token}


def test_the_ratio_of_p99s_decides_when_every_high_request_streamed() -> None:
    assert high_verdict({0.5: row(22.0), 3.0: row(26.0)}, 0.5, 3.0) == (26.0 / 22.0, 0, True)
    assert high_verdict({0.5: row(22.0), 3.0: row(30.0)}, 0.5, 3.0)[2] is False


def test_stranded_high_requests_miss_whatever_the_ratio() -> None:
    ratio, stranded, met = high_verdict({0.5: row(22.0), 3.0: row(22.0, not_started=11)}, 0.5, 3.0)
    assert (ratio, stranded, met) == (1.0, 11, False)
    assert high_verdict({0.5: row(22.0, no_first_token=1), 3.0: row(22.0)}, 0.5, 3.0)[1:] == (1, False)


def test_loads_other_than_designs_get_no_verdict() -> None:
    """DESIGN's row compares 3x overload with 0.5x load: another pair (the aging recipe's 1.5x alone) is no
    judgement of it."""
    assert high_verdict({0.5: row(22.0), 1.5: row(22.0)}, 0.5, 1.5) == (1.0, 0, None)
