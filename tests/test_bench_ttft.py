"""The order of `bench ttft`'s calls (loadtest/scenarios/ttft.py `round_orders`): every way through
Sluicegate runs once a round, right after a direct call, so that none finds another's code still warm in
the caches; and in a seeded, shuffled order, so that no way keeps a fixed place in the round."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sluicegate.loadtest import bench, common
from sluicegate.loadtest.scenarios import ttft
from sluicegate.loadtest.scenarios.ttft import round_orders

MODES = ["direct", "floor", "chat", "sse", "against"]


def test_each_way_through_sluicegate_runs_once_a_round_right_after_a_direct_call() -> None:
    for order in round_orders(MODES, 200):
        assert order[0::2] == ["direct"] * 4
        assert sorted(order[1::2]) == sorted(MODES[1:])


def test_the_order_is_shuffled_and_a_rerun_repeats_it() -> None:
    rounds = round_orders(MODES, 400)
    assert rounds == round_orders(MODES, 400)
    assert rounds != round_orders(MODES, 400, seed=1)
    for mode in MODES[1:]:  # each place in the round about equally often (100 each expected)
        places = Counter(order[1::2].index(mode) for order in rounds)
        assert len(places) == 4 and min(places.values()) >= 60, (mode, places)
    predecessors = Counter((order[i - 2], order[i]) for order in rounds for i in range(3, len(order), 2))
    assert len(predecessors) == 12  # every way also comes two calls after every other one


def test_without_direct_calls_the_ways_alone_and_direct_alone_is_one_call_a_round() -> None:
    assert all(sorted(order) == ["chat", "sse"] for order in round_orders(["chat", "sse"], 20))
    assert round_orders(["direct"], 3) == [["direct"]] * 3


def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way `ttft` starts a process (its engine server, serve, a component) notes it in the list returned
    and raises instead: a refusal must come before any of them."""
    started: list[str] = []

    def start(*args: Any, **kwargs: Any) -> None:
        started.append("something")
        raise RuntimeError("started")

    monkeypatch.setattr(ttft, "engine_server", start)
    monkeypatch.setattr(common.ServeProcess, "start", start)
    monkeypatch.setattr(common.Component, "start", start)
    return started


def test_against_a_checkout_without_its_own_venv_is_refused_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """This tree's python in another DIR would run `sluicegate/` from DIR but sluicegate.api, .sessions ... from
    this tree (its editable install maps them here): a mix of both trees, timed as the other one."""
    other = tmp_path / "other"
    (other / "sluicegate").mkdir(parents=True)
    started = nothing_starts(monkeypatch)
    assert bench.main(["ttft", "--against", str(other)]) == 2
    assert not started
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sluicegate bench ttft: {other} has no .venv of its own")


def test_this_tree_runs_in_this_python_and_another_only_in_its_own_venv(tmp_path: Path) -> None:
    assert common.checkout_python(common.ROOT) == sys.executable
    assert common.checkout_python(common.ROOT / "loadtest" / "..") == sys.executable
    with pytest.raises(common.CheckoutRefused, match="has no .venv of its own"):
        common.checkout_python(tmp_path)
    own = tmp_path / ".venv" / "bin" / "python"
    own.parent.mkdir(parents=True)
    own.write_text("")
    assert common.checkout_python(tmp_path) == str(own)
