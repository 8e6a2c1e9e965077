"""The `resume` benchmark's pooling (loadtest/scenarios/resume.py): `--runs N` reports each case's
percentiles over the reconnects of every run, not an average of the runs' own percentiles, so one run's
burst of host stalls counts as the share of all reconnects it is."""

from __future__ import annotations

import pytest

from sluicegate.loadtest.common import percentile
from sluicegate.loadtest.scenarios import resume

pytestmark = pytest.mark.single_server  # no Redis: once is enough


def outcome(finished: list[float], live: list[float]) -> dict[str, dict[str, list[float]]]:
    return {"samples_ms": {"finished/request": finished, "live/session": live}}


def test_pooled_percentiles_are_taken_over_every_runs_reconnects() -> None:
    quiet = outcome([1.0] * 99 + [2.0], [1.5] * 100)
    stalled = outcome([1.0] * 95 + [20.0] * 5, [1.5] * 100)
    # On its own the stalled run's p99 is 20 ms; pooled with a quiet run, 200 reconnects of which 5 (2.5%) stalled.
    assert resume.case_row("finished/request", stalled["samples_ms"]["finished/request"])["p99_ms"] == 20.0
    rows = [resume.case_row(case, ms) for case, ms in resume.pooled([quiet, stalled]).items()]
    by_case = {f"{row['request']}/{row['stream']}": row for row in rows}
    assert by_case["finished/request"]["reconnects"] == 200
    assert by_case["finished/request"]["p99_ms"] == 20.0  # 5 of 200 above: the 99th percentile is a stall
    assert by_case["finished/request"]["p90_ms"] == 1.0
    assert by_case["finished/request"]["max_ms"] == 20.0
    assert by_case["live/session"] == {"request": "live", "stream": "session", "reconnects": 200, "p50_ms": 1.5,
                                       "p90_ms": 1.5, "p99_ms": 1.5, "max_ms": 1.5}
    twice = resume.pooled([quiet, quiet])["finished/request"]
    assert resume.case_row("finished/request", twice)["p99_ms"] == 1.0  # 2 of 200 at 2.0 ms: under the 99th


def test_percentiles_are_nearest_rank() -> None:
    """The smallest value with at least q% of them at or below it: 1 slow value in 100 is the p100, not the
    p99, whatever the count's parity (rounding halves to even took the rank above when q% of n was odd)."""
    assert percentile([1.0] * 99 + [2.0], 99) == 1.0
    assert percentile([1.0] * 297 + [2.0] * 3, 99) == 1.0
    assert percentile([1.0] * 296 + [2.0] * 4, 99) == 2.0
    assert percentile(list(range(1, 11)), 50) == 5
    assert percentile([1, 2], 50) == 1
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3
    assert percentile(list(range(1, 101)), 7) == 7  # 7% of 100 is 7, not a float's 7.000000000000001
