"""The `cluster` benchmark (loadtest/scenarios/cluster.py): its stream check catches a missed, repeated
or reordered token index, its verdict fails a run whose load sits on one master, and a small run of
the whole scenario (embedded 3-master cluster, API, scheduler, sim workers) passes."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import redis

from sluicegate.loadtest.scenarios import cluster as bench


def stream(indices: list[int], *, done: bool = True) -> bytes:
    body = b"id: 1\nevent: started\ndata: {}\n\n"
    for seq, index in enumerate(indices, start=2):
        body += (f'id: {seq}\nevent: token\ndata: {{"request_id":"ab1","index":{index},"text":"t{index}"}}\n\n'
                 .encode())
    return body + (b'id: 99\nevent: done\ndata: {"request_id":"ab1"}\n\n' if done else b"")


def test_the_stream_check_accepts_every_index_once_in_order_and_nothing_else() -> None:
    assert bench.check_stream(stream([0, 1, 2]), 3) is None
    assert "missing [1]" in (bench.check_stream(stream([0, 2]), 3) or "")
    assert bench.check_stream(stream([0, 1, 1, 2]), 3) is not None  # repeated
    assert bench.check_stream(stream([0, 2, 1]), 3) is not None  # reordered
    assert "no `done`" in (bench.check_stream(stream([0, 1, 2], done=False), 3) or "")


def args(**overrides: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()])


@pytest.fixture
def results(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the scenario would write to loadtest/results/cluster.json (the real file is left alone)."""
    written: dict[str, Any] = {}
    monkeypatch.setattr(bench, "write_result", lambda name, result: written.update(result))
    return written


def test_a_master_with_too_many_appends_fails_the_run(results: dict[str, Any]) -> None:
    masters = [bench.Master(i, 7000 + i, redis.Redis(), []) for i in range(3)]
    before = [{"cpu": 0.0, "fcall": 0, "tokens": 0} for _ in masters]
    after = [{"cpu": 1.0, "fcall": 10, "tokens": t} for t in (60, 20, 20)]
    tally = bench.Tally(requests=2, tokens=100, latencies=[0.1, 0.2])
    with pytest.raises(SystemExit):
        bench.report(args(sessions=2), tally, 1.0, masters, before, after, [30, 30, 40], {}, 0.1, 4)
    assert results["failures"] == ["master 0 (:7000) took 60.0% of the token appends (allowed <= 45%)"]


def test_a_small_run_on_a_real_cluster_spreads_keys_and_appends(results: dict[str, Any]) -> None:
    outcome = bench.run(args(sessions=150, clients=16, workers=1, timeout=60))
    assert outcome["failures"] == [] and outcome["summary"]["requests"] == 150
    masters = outcome["masters"]
    assert len(masters) == 3 and sum(m["buckets"] for m in masters) == 1024
    assert all(0.15 <= m["key_share"] <= 0.45 and m["append_share"] <= 0.45 for m in masters), masters
    assert results["summary"]["tokens_per_s"] > 0
