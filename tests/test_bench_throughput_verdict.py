"""The `throughput` benchmark's verdicts (loadtest/scenarios/throughput.py): DESIGN's two rows, 1,000 req/s on
the chat route and the resumable route at >= 80% of it, are judged only in the setup they are for (32 clients,
2 cores, in front of the sim-backend); any other setup prints its figure with no verdict."""

from __future__ import annotations

import argparse

import pytest

from sluicegate.loadtest.scenarios import throughput

pytestmark = pytest.mark.single_server  # no Redis: once is enough


def setup(clients: int = 32, engine_server: str = "sim-backend") -> argparse.Namespace:
    return argparse.Namespace(clients=clients, engine_server=engine_server, mode="both")


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throughput, "cores", lambda: 2)


@pytest.mark.usefixtures("two_cores")
def test_the_designs_setup_gets_both_verdicts() -> None:
    assert throughput.share_line(0.79, setup())[1]["target_met"] is False
    assert throughput.share_line(0.80, setup())[1]["target_met"] is True
    assert throughput.target_line(1000.0, setup())[1]["target_met"] is True
    assert throughput.target_line(999.0, setup())[1]["target_met"] is False


@pytest.mark.usefixtures("two_cores")
def test_another_setup_gets_no_verdict() -> None:
    for args in (setup(clients=64), setup(engine_server="sim")):
        line, fields = throughput.share_line(0.95, args)
        assert fields["target_met"] is None and line.startswith("no verdict"), line
        assert throughput.target_line(5000.0, args)[1]["target_met"] is None
    assert throughput.target_line(5000.0, setup(), "sse")[1]["target_met"] is None  # the 1,000 is the chat route's


def test_more_cores_get_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throughput, "cores", lambda: 4)
    assert throughput.share_line(0.95, setup())[1]["target_met"] is None
    assert throughput.target_line(5000.0, setup())[1]["target_met"] is None
