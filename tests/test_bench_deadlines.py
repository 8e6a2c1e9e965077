"""`bench deadlines`' read-back (loadtest/scenarios/deadlines.py `analyse`): its TTFT p50 is nearest-rank, as every
percentile the benches report (README), not the upper of the two middle values."""

from __future__ import annotations

import argparse

import pytest

from sluicegate.loadtest.scenarios import deadlines
from sluicegate.loadtest.scenarios.live import Submitted

pytestmark = pytest.mark.single_server  # no Redis: once is enough


def test_the_ttft_p50_is_nearest_rank() -> None:
    waits_ms = {"tight": [100.0, 200.0, 300.0, 400.0], "loose": [1000.0, 2000.0, 3000.0]}
    submitted, views = [], {}
    for kind, waits in waits_ms.items():
        for i, wait in enumerate(waits):
            rid = f"{kind}{i}"
            submitted.append(Submitted(rid, at=float(i), tags={"tenant": "w1", "kind": kind}))
            views[rid] = {"submitted_at": 100.0 + i, "first_token_at": 100.0 + i + wait / 1000}
    args = argparse.Namespace(bucket=10.0, warmup=0.0)
    timeline = [(0.0, {"w1": 0.0}), (10.0, {"w1": 100.0})]
    result = deadlines.analyse(args, "off", submitted, views, {"tight": 300, "loose": 10_000}, ["w1"], {"w1": 1.0},
                               timeline, 10.0)
    # 4 values: the 2nd is the smallest with half of them at or below it (sorted(v)[len(v) // 2] took the 3rd)
    assert result["ttft_p50_ms"] == {"tight": 200.0, "loose": 2000.0}
    assert result["attainment"]["tight"] == {"all": 0.75, "w1": 0.75}
