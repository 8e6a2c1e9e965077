"""`bench calls` (loadtest/scenarios/calls.py): the library's calls of a request's life, counted by the server.
Its counts are what two trees are compared by, so they must come out the same every round and add up."""

from __future__ import annotations

import argparse

import pytest

from sluicegate.loadtest.scenarios import calls


def _rounds(requests: int, tokens: int, rounds: int) -> list[list[dict[str, object]]]:
    result = calls.run(argparse.Namespace(requests=requests, tokens=tokens, rounds=rounds, idle_ms=""))  # checks all
    rows = result["rows"]
    return [rows[i:i + 4] for i in range(0, len(rows), 4)]


@pytest.mark.single_server  # the one-server functions, on a scratch server of its own
def test_each_phase_counts_its_own_calls_the_same_every_round_and_a_request_adds_them_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "write_result", lambda name, result: None)  # keep loadtest/results/ a bench's
    three = _rounds(requests=4, tokens=3, rounds=3)
    assert len(three) == 3
    for submit, append, finish, total in three:
        assert (submit["calls"], append["calls"], finish["calls"]) == (4, 8, 4)
        assert total["commands_a_call"] == pytest.approx(
            submit["commands_a_call"] + 2 * append["commands_a_call"] + finish["commands_a_call"])
        assert min(submit["commands_a_call"], append["commands_a_call"], finish["commands_a_call"]) >= 1
    # the group's and the tenant's first calls do a little more (round 1); after them, every round alike
    assert [row["commands_a_call"] for row in three[1]] == [row["commands_a_call"] for row in three[2]]

    # one token: no append call, and the finish carries the request's first token, with what a first token
    # records (its time, the time-to-first-token histogram) that an append did before
    (one,) = _rounds(requests=4, tokens=1, rounds=1)
    assert one[1]["calls"] == 0
    assert one[0]["commands_a_call"] == three[0][0]["commands_a_call"]
    assert one[2]["commands_a_call"] > three[0][2]["commands_a_call"]
    assert one[3]["commands_a_call"] == pytest.approx(one[0]["commands_a_call"] + one[2]["commands_a_call"])


@pytest.mark.single_server
def test_the_submits_after_idleness_take_the_first_tokens_way_one_phase_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--idle-ms`: one phase of submits per idle time, each started at once in its own call (the run checks
    every request's status), so each phase counts the same commands as the rounds' submit phase."""
    monkeypatch.setattr(calls, "write_result", lambda name, result: None)
    result = calls.run(argparse.Namespace(requests=3, tokens=2, rounds=1, idle_ms="0, 2, 2"))
    submit = result["rows"][0]
    assert [(row["idle_ms"], row["calls"]) for row in result["after_idle"]] == [(0.0, 3), (2.0, 3), (2.0, 3)]
    for row in result["after_idle"]:
        assert row["commands_a_call"] == pytest.approx(submit["commands_a_call"], abs=1)
        assert row["usec_a_call"] > 0
    with pytest.raises(ValueError):
        calls.idle_times("5,-1")
