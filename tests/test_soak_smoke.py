"""The `soak` benchmark (loadtest/scenarios/soak.py): its stream check catches a missed or repeated
token index across reconnects, its key check tells fixed keys from leaked ones, and a tiny run of
the whole scenario (own Valkey, API, scheduler, sim workers, drops and a flooder) ends clean."""

from __future__ import annotations

import argparse
import gc
from typing import Any

import pytest

from sluicegate.loadtest.scenarios import soak


def test_the_stream_check_counts_gaps_and_doubles_across_reconnects() -> None:
    clean = soak.StreamCheck(4)
    for eid, index in ((3, 0), (4, 1), (5, 2), (6, 3)):
        clean.event_id(eid)
        clean.token(index)
    clean.finish()
    assert (clean.gaps, clean.doubles, clean.id_regressions) == (0, 0, 0)

    resumed = soak.StreamCheck(4)
    for index in (0, 1, 1, 3):  # a replayed token after a resume, then one skipped
        resumed.token(index)
    resumed.event_id(5)
    resumed.event_id(5)
    resumed.finish()
    assert (resumed.gaps, resumed.doubles, resumed.id_regressions) == (1, 1, 1)

    short = soak.StreamCheck(5)
    short.token(0)
    short.finish()  # `done` after one token of five
    assert short.gaps == 4


def test_the_key_check_allows_only_fixed_keys() -> None:
    assert soak.classify("sg:{s:a1}:m") == "fixed"
    assert soak.classify("sg:{s:a1}:u") == "fixed"
    assert soak.classify("sg:{g:default}:vtc") == "fixed"
    assert soak.classify("sg:{g:default}:w:default.abc") == "fixed"
    assert soak.classify("sg:groups") == "fixed"
    assert soak.classify("rq:workers") == "fixed"
    assert soak.classify("sg:{s:a1}:s:soak-1-0:l") == "leaked-data"
    assert soak.classify("sg:{s:a1}:r:a1xyz") == "leaked-data"
    assert soak.classify("sg:{s:a1}:ob") == "leaked-control"
    for suffix in ("ri", "leases", "tk", "run", "ro", "rt:t1", "rq", "c5", "c5:t1", "age5", "w:default.abc:in"):
        assert soak.classify(f"sg:{{g:default}}:{suffix}") == "leaked-control", suffix


def test_slope_and_stream_split() -> None:
    assert soak.slope([(0, 10.0), (10, 10.0), (20, 10.0)]) == 0.0
    assert soak.slope([(0, 0.0), (10, 5.0), (20, 10.0)]) == pytest.approx(0.5)
    assert soak.split_streams(1000, {"t1": 1, "t2": 2, "t4": 4}) == {"t1": 143, "t2": 286, "t4": 571}


@pytest.mark.own_servers
def test_a_tiny_soak_has_no_gap_no_double_and_leaves_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    written: dict[str, Any] = {}
    monkeypatch.setattr(soak, "write_result", lambda name, result: written.update(result))
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    args = parser.parse_args(["--streams", "20", "--duration", "8", "--workers", "1", "--tokens-per-second", "8",
                              "--max-tokens", "2,6", "--think", "0.1,0.3", "--drop-rate", "0.5",
                              "--flood-backlog", "10", "--flood-submitters", "2", "--session-ttl", "2",
                              "--sample-every", "2"])
    collector = (gc.get_threshold(), gc.get_freeze_count())
    result = soak.run(args)  # raises SystemExit on a gap, a double or a leaked key
    assert (gc.get_threshold(), gc.get_freeze_count()) == collector  # the load generator's tuning is undone
    assert set(result["valkey_stalls"]) == {"phase1", "phase2"}  # Valkey's latency monitor, read per phase
    assert set(result["preempted"]) == {"phase1", "phase2"}  # preemptions by reason, from the server's counters
    phase1 = result["preempted"]["phase1"]  # 1.1 x as many slots as streams: no tenant ever waits for one
    assert phase1.get("fair_share", 0) == phase1.get("priority", 0) == 0, phase1
    streams = result["streams"]
    assert streams["requests"] > 20 and streams["resumed_requests"] > 0 and streams["flood_submitted"] > 0
    assert streams["gaps"] == streams["doubles"] == 0
    assert result["keys"]["leaked"] == 0 and result["keys"]["idle_tickets"] == result["keys"]["slots"]
    assert written["memory"][0]["metric"] == "used_memory"
