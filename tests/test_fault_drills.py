"""The cheaper fault drills of `sluicegate bench drills`, small: an API process killed under its streams, Redis
black-holed for 3 s, the scheduler killed (and then a worker, with no scheduler to hand its runs back).

Each starts its own stack as real processes (Valkey, `sluicegate api`, scheduler, 2 sim workers) and
checks what the bench checks: every accepted request ends `done`, and its replayed token indices are
0..n-1, each once; no 5xx but 503, and every 503 carries Retry-After. Timing limits are generous on
purpose (a noisy 2-core host): these prove that nothing is lost or hangs, not how fast it recovers.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from sluicegate.loadtest.scenarios.drills import run_drill

pytestmark = [pytest.mark.own_servers, pytest.mark.timeout(90)]


def drill_args(**overrides: Any) -> argparse.Namespace:
    settings = {"drill": "all", "requests": 40, "seconds": 6.0, "tokens_per_second": 100.0, "max_tokens": 80,
                "blackhole_seconds": 3.0, "max_hang_seconds": 10.0, "everysec_loss_seconds": 1.0,
                "drain_seconds": 40.0}
    return argparse.Namespace(**{**settings, **overrides})


def passed(figures: dict[str, Any]) -> dict[str, Any]:
    assert not figures["problems"], f"{figures['problems']}\n{figures.get('logs', '')}"
    assert figures["accepted"] > 0 and figures["completed"] == figures["accepted"] - figures["lost"]
    assert figures["lost"] == 0 and figures["replay_wrong"] == 0 and figures["live_index_anomalies"] == 0
    return figures


def test_api_killed_under_its_streams_they_resume_through_the_other() -> None:
    figures = passed(run_drill("api", drill_args()))
    assert figures["streams_open_at_kill"] > 0
    assert figures["streams_resumed"] > 0, "no stream was cut: the kill proved nothing"
    assert figures["resume_gap_max_s"] < 15


def test_redis_blackholed_the_api_answers_and_recovers() -> None:
    figures = passed(run_drill("blackhole", drill_args()))
    assert figures["calls_during"] > 0
    assert set(figures["statuses_during"]) <= {"200", "202", "503"}, figures["statuses_during"]
    assert figures["recovery_s"] is not None and figures["recovery_s"] < 15


def test_scheduler_killed_work_goes_on_and_a_new_one_hands_back_lost_runs() -> None:
    figures = passed(run_drill("scheduler", drill_args(requests=50, seconds=10.0)))
    assert figures["completed_while_no_scheduler"] > 0  # dispatch is inline: no scheduler needed
    assert figures["stranded_resumed_before_restart"] == 0  # only a sweep hands lapsed runs back
