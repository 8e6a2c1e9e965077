"""`bench decision`'s verdict (loadtest/scenarios/decision.py): a size's p99 meets DESIGN's 1 ms only when every
sample dispatched a request and the depth held; a run that timed calls which dispatched nothing is a miss."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

from sluicegate.loadtest.scenarios import decision


def row(queued: int, **changes: Any) -> dict[str, Any]:
    return {"queued": queued, "samples": 2000, "dispatched": 2000, "p50_ms": 0.05, "p99_ms": 0.09, "max_ms": 0.2,
            "rtt_p50_ms": 0.1, "rtt_p99_ms": 0.2, "ping_ms": 0.05, "commands": 6, "us_per_command": 8.0,
            "used_memory_mb": 970.0, "steal_pct": 0.0, "queued_after": queued, "group_queued": queued,
            "tenants": 1000, "groups": 1, **changes}  # DESIGN's 1,000 tenants, as `scenario` writes them


def targets(monkeypatch: pytest.MonkeyPatch, *rows: dict[str, Any]) -> dict[str, Any]:
    """`run`'s verdict on these measured rows (the filled server replaced by its rows)."""
    async def measured(args: argparse.Namespace) -> dict[str, Any]:
        return {"rows": list(rows)}

    monkeypatch.setattr(decision, "scenario", measured)
    monkeypatch.setattr(decision, "write_result", lambda name, result: None)
    return decision.run(argparse.Namespace(no_plot=True))["targets"]


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    decision.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_fast_p99_of_real_decisions_meets_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    got = targets(monkeypatch, row(100_000), row(1_000_000))
    assert got["p99_at_100k_ok"] is True and got["p99_at_1m_ok"] is True
    assert got["p99_at_1m_miss"] is None


def test_samples_that_dispatched_nothing_are_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's run: nothing dispatched and the queue grew; its 0.09 ms p99 timed no decision."""
    got = targets(monkeypatch, row(1_000_000, dispatched=0, queued_after=1_002_000))
    assert got["p99_at_1m_ok"] is False
    assert got["p99_at_1m_miss"] == "0 of 2000 samples dispatched"


def test_a_few_empty_samples_or_a_depth_that_moved_are_a_miss() -> None:
    assert decision.p99_verdict(row(100_000, dispatched=1999)) == (False, "1999 of 2000 samples dispatched")
    ok, why = decision.p99_verdict(row(100_000, queued_after=99_000))
    assert not ok and why.startswith("the depth did not hold")
    assert decision.p99_verdict(row(100_000, p99_ms=1.2)) == (False, "p99 1.200 ms > 1 ms")
    assert decision.p99_verdict(row(100_000, samples=0, dispatched=0))[0] is False
    assert decision.p99_verdict(None) == (False, "not measured")


def test_by_default_every_request_queues_in_the_one_group_a_decision_reads() -> None:
    """DESIGN's case is 1M queued for the decision: a decision reads only its own group's state, so 10 groups
    timed decisions that each saw ~100k."""
    assert parsed().groups == 1
    assert parsed("--million").groups == 1


def test_a_decision_that_saw_part_of_the_queue_in_its_group_is_a_miss(monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert decision.p99_verdict(row(1_000_000, group_queued=99_500)) == (
        False, "a decision saw 99,500 queued in its group, not 1,000,000 (the requests spread over groups; a "
               "decision reads only its own group's)")
    got = targets(monkeypatch, row(100_000, group_queued=10_000), row(1_000_000, group_queued=100_000))
    assert got["p99_at_1m_ok"] is False and got["p99_at_100k_ok"] is False
    assert (got["p99_at_1m_group_queued"], got["p99_at_100k_group_queued"]) == (100_000, 10_000)
    assert "target p99 <= 1 ms with 1M queued in the decided group" in capsys.readouterr().out


@pytest.mark.own_servers
@pytest.mark.parametrize(("groups", "whole"), [(1, True), (2, False)])
def test_a_small_run_counts_the_queue_of_the_decided_group(groups: int, whole: bool) -> None:
    """200 queued on a scratch Valkey: in one group each decision sees all 200; over two, fewer."""
    args = parsed("--sizes", "200", "--samples", "20", "--tenants", "10", "--concurrency", "8",
                  "--groups", str(groups))
    got = asyncio.run(decision.scenario(args))["rows"][0]
    assert got["queued"] == got["queued_after"] == 200 and got["dispatched"] == 20
    assert (got["group_queued"] == 200) is whole and 0 < got["group_queued"] <= 200
    assert decision.p99_verdict({**got, "p99_ms": 0.5})[0] is whole


def test_a_row_that_does_not_name_its_tenants_is_refused() -> None:
    """Every measured row names its tenants; one that does not is not judged as if it had DESIGN's 1,000."""
    unnamed = {k: v for k, v in row(1_000_000).items() if k != "tenants"}
    with pytest.raises(KeyError, match="tenants"):
        decision.size_verdict(unnamed)
    assert decision.size_verdict(row(1_000_000)) == (True, "")
