"""Verdicts against DESIGN's row only in the row's setup: `bench memory` with a prompt other than 100 characters
and `bench cluster` with other than 3 masters print "no verdict" and store None; the cluster's own key-share
bound is a check, not a target. (`bench fairness`'s setups: tests/test_bench_fairness_verdict.py.)"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import redis

from sluicegate.loadtest.scenarios import cluster, memory


def test_memory_judges_only_a_100_char_prompt() -> None:
    assert memory.memory_verdict(900.0, 100) is True
    assert memory.memory_verdict(1100.0, 100) is False
    assert memory.memory_verdict(900.0, 50) is None
    assert memory.off_design(None) == "no verdict (DESIGN's row is for a 100-char prompt)"


@pytest.mark.single_server  # a scratch server of its own
def test_a_memory_run_with_a_shorter_prompt_stores_no_verdict(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(memory, "write_result", lambda name, result: None)  # keep loadtest/results/ a bench's
    args = argparse.Namespace(requests=200, prompt_chars=20, max_tokens=256, tenants=1, via="store", concurrency=8,
                              sample=20, server_binary=None)
    result = memory.run(args)
    assert result["target_met"] is None
    assert "no verdict (DESIGN's row is for a 100-char prompt)" in capsys.readouterr().out


def cluster_args(masters: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cluster.add_arguments(parser)
    return parser.parse_args(["--sessions", "2", "--masters", str(masters)])


def cluster_report(masters: int, tokens: list[int], keys: list[int],
                   monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`report` on a clean run whose masters took these token appends and hold these keys."""
    written: dict[str, Any] = {}
    monkeypatch.setattr(cluster, "write_result", lambda name, result: written.update(result))
    nodes = [cluster.Master(i, 7000 + i, redis.Redis(), []) for i in range(masters)]
    before = [{"cpu": 0.0, "fcall": 0, "tokens": 0} for _ in nodes]
    after = [{"cpu": 1.0, "fcall": 10, "tokens": t} for t in tokens]
    tally = cluster.Tally(requests=2, tokens=sum(tokens), latencies=[0.1, 0.2])
    try:
        cluster.report(cluster_args(masters), tally, 1.0, nodes, before, after, keys, {}, 0.1, 4)
    except SystemExit:
        written["exited"] = True
    return written


def test_three_masters_get_the_verdict_and_the_key_share_is_a_check(monkeypatch: pytest.MonkeyPatch) -> None:
    result = cluster_report(3, [34, 33, 33], [30, 30, 40], monkeypatch)
    assert "exited" not in result
    assert result["targets"] == {"masters": 3, "max_append_share": 0.45, "met": True}
    assert result["checks"] == {"key_share": [0.15, 0.45], "met": True}

    lopsided_keys = cluster_report(3, [34, 33, 33], [10, 40, 50], monkeypatch)
    assert lopsided_keys["exited"] and lopsided_keys["targets"]["met"] is True  # the check fails the run,
    assert lopsided_keys["checks"]["met"] is False  # not DESIGN's target


def test_two_masters_get_no_verdict_on_the_append_share(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    result = cluster_report(2, [50, 50], [70, 80], monkeypatch)  # 50% each: above 45%, as two masters must be
    assert result["targets"]["met"] is None
    assert not any("token appends" in failure for failure in result["failures"]), result["failures"]
    assert "no verdict (DESIGN's row is for 3 masters)" in capsys.readouterr().out
