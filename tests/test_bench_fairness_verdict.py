"""`bench fairness`'s verdict (loadtest/scenarios/fairness.py `analyse`): a 60 s window with no tokens while
requests wait is a failed window (the run's tail included), and a setup other than DESIGN's row (2-3x overload,
60 s windows) gets no verdict."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from sluicegate.loadtest.scenarios import fairness

WEIGHTS = [1.0, 2.0, 4.0, 8.0]
TENANTS = [f"w{w:g}" for w in WEIGHTS]
TARGETS = {t: w / sum(WEIGHTS) for t, w in zip(TENANTS, WEIGHTS, strict=True)}
RATE = 1500.0  # tokens/s of the group while it serves


def run_data(serves_until: float, *, waiting: bool = True) -> tuple[list[tuple[float, dict[str, float]]],
                                                                      dict[str, dict[str, Any]]]:
    """A 90 s run whose group serves every tenant exactly its weight share until `serves_until`, then nothing;
    with `waiting`, requests submitted after that stay queued (backlogged), else none is submitted after it."""
    timeline = [(float(t), {ten: RATE * TARGETS[ten] * min(t, serves_until) for ten in TENANTS}) for t in range(91)]
    views = {}
    for ten in TENANTS:
        for k in range(200):
            sub = k * 0.45
            if sub >= serves_until - 1 and not waiting:
                break
            views[f"{ten}-{k}"] = {"tenant": ten, "submitted_at": 1000.0 + sub,
                                   "started_at": 1000.0 + sub + 0.5 if sub < serves_until - 1 else None}
    return timeline, views


def analyse(serves_until: float = 90.0, *, waiting: bool = True, **settings: float) -> dict[str, Any]:
    args = argparse.Namespace(**{"warmup": 5.0, "window": 60.0, "max_wait_seconds": 60.0, "overload": 3.0,
                                 **settings})
    timeline, views = run_data(serves_until, waiting=waiting)
    return fairness.analyse(args, 1.0, TENANTS, TARGETS, timeline, views, 90.0, {t: 500 for t in TENANTS})


def test_a_group_that_serves_its_shares_throughout_meets_every_target() -> None:
    assert analyse()["targets_ok"] == {"share": True, "window": True, "jain": True}


@pytest.mark.parametrize("serves_until", [20.0, 30.0])
def test_a_group_that_stops_serving_while_backlogged_fails_the_window_target(serves_until: float) -> None:
    """Stopped at 20 s, the window 25-85 s has no token; stopped at 30 s, the run's last window (30-90 s) has
    none. Both used to be left out, so the window target read met."""
    result = analyse(serves_until)
    assert result["targets_ok"]["window"] is False
    empty = [w for w in result["windows"] if w["from_s"] >= serves_until]
    assert empty and all(w["max_dev"] == 1.0 for w in empty), result["windows"]  # every share 0 of its weight


def test_an_empty_window_with_nothing_waiting_is_no_failure() -> None:
    result = analyse(30.0, waiting=False)  # the load stopped, so nothing to serve: no window to judge
    assert result["windows"][-1]["to_s"] < 90.0
    assert result["targets_ok"]["window"] is True


def test_the_runs_last_window_is_judged() -> None:
    starts, length = fairness.window_starts(5.0, 90.0, 60.0)
    assert (starts, length) == ([5.0, 15.0, 25.0, 30.0], 60.0)
    assert fairness.window_starts(5.0, 85.0, 60.0) == ([5.0, 15.0, 25.0], 60.0)  # 25-85 is the last already


@pytest.mark.parametrize("overload", [1.5, 4.0])
def test_an_overload_outside_designs_row_gets_no_verdict(overload: float) -> None:
    assert analyse(overload=overload)["targets_ok"] == {"share": None, "window": None, "jain": None}
    assert fairness.off_design(None).startswith("no verdict (DESIGN's row is for 2-3x overload")


def test_another_window_gets_no_window_verdict() -> None:
    assert analyse(window=30.0)["targets_ok"] == {"share": True, "window": None, "jain": True}
    assert analyse(overload=2.0)["targets_ok"] == {"share": True, "window": True, "jain": True}


def test_a_group_that_serves_nothing_after_the_warmup_misses_and_the_run_still_writes_its_result(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Every share 0 after the warm-up (a stalled scheduler): Jain's index is 0, a miss, where it divided by zero."""
    assert fairness.jain([0.0, 0.0, 0.0, 0.0]) == 0.0
    analysed = analyse(5.0)  # serves its shares until the end of the 5 s warm-up, then nothing, requests waiting
    assert analysed["jain"] == 0.0
    assert analysed["targets_ok"] == {"share": False, "window": False, "jain": False}

    async def measured(args: argparse.Namespace) -> list[dict[str, Any]]:
        return [{**analysed, "submit_errors": 0}]

    written: dict[str, Any] = {}
    monkeypatch.setattr(fairness, "scenario", measured)
    monkeypatch.setattr(fairness, "write_result", lambda name, result: written.setdefault(name, result))
    monkeypatch.setattr(fairness.plots, "fairness_share", lambda *a, **k: None)
    fairness.run(argparse.Namespace(overload=3.0, weights="1,2,4,8", no_plot=False))
    assert written["fairness"]["runs"][0]["targets_ok"]["jain"] is False
    assert "targets: share MISSED, window MISSED, jain MISSED" in capsys.readouterr().out


def test_run_reads_its_no_plot_flag_from_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--no-plot` is one of fairness's arguments: `run` reads it as such, with no default for a Namespace that
    lacks it, and draws the plot only when it is off."""
    async def measured(args: argparse.Namespace) -> list[dict[str, Any]]:
        return [{**analyse(), "submit_errors": 0}]

    drawn: list[str] = []
    monkeypatch.setattr(fairness, "scenario", measured)
    monkeypatch.setattr(fairness, "write_result", lambda name, result: None)
    monkeypatch.setattr(fairness.plots, "fairness_share", lambda *a, **k: drawn.append("plot"))
    with pytest.raises(AttributeError, match="no_plot"):
        fairness.run(argparse.Namespace(overload=3.0, weights="1,2,4,8"))
    assert drawn == []
    fairness.run(argparse.Namespace(overload=3.0, weights="1,2,4,8", no_plot=True))
    assert drawn == []
    fairness.run(argparse.Namespace(overload=3.0, weights="1,2,4,8", no_plot=False))
    assert drawn == ["plot"]
