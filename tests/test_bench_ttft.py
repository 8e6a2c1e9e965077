"""The order of `bench ttft`'s calls (loadtest/scenarios/ttft.py `round_orders`): every way through
Sluicegate runs once a round, right after a direct call, so that none finds another's code still warm in
the caches; and in a seeded, shuffled order, so that no way keeps a fixed place in the round."""

from __future__ import annotations

from collections import Counter

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
