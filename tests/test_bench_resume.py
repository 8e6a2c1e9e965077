"""The `resume` benchmark's pooling (loadtest/scenarios/resume.py): `--runs N` reports each case's
percentiles over the reconnects of every run, not an average of the runs' own percentiles, so one run's
burst of host stalls counts as the share of all reconnects it is."""

from __future__ import annotations

import pytest

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
