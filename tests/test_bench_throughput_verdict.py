"""The `throughput` benchmark's verdicts (loadtest/scenarios/throughput.py): DESIGN's two rows, 1,000 req/s on
the chat route and the resumable route at >= 80% of it, are judged only in the setup they are for (32 clients,
2 cores, 16-token answers in front of the sim-backend; the share with the routes alternating); any other setup
prints its figure with no verdict."""

from __future__ import annotations

import argparse

import pytest

from sluicegate.loadtest.scenarios import throughput

pytestmark = pytest.mark.single_server  # no Redis: once is enough


def setup(clients: int = 32, engine_server: str = "sim-backend", max_tokens: int = 16,
          rounds: int = 2) -> argparse.Namespace:
    return argparse.Namespace(clients=clients, engine_server=engine_server, mode="both", max_tokens=max_tokens,
                              rounds=rounds)


def measured(*routes: str, rounds: int = 2) -> list[throughput.Phase]:
    """Phases that `phases_verdict` judges (10 s each, thousands completed, none failed): the verdicts below
    are the setup rule's, not the phases'."""
    return [throughput.Phase(route, n, 8000, 10.0, 0) for n in range(1, rounds + 1) for route in routes]


CHAT = measured("chat")
BOTH = measured("chat", "sse")


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throughput, "cores", lambda: 2)


@pytest.mark.usefixtures("two_cores")
def test_the_designs_setup_gets_both_verdicts() -> None:
    assert throughput.share_line(0.79, setup(), phases=BOTH)[1]["target_met"] is False
    assert throughput.share_line(0.80, setup(), phases=BOTH)[1]["target_met"] is True
    assert throughput.target_line(1000.0, setup(), phases=CHAT)[1]["target_met"] is True
    assert throughput.target_line(999.0, setup(), phases=CHAT)[1]["target_met"] is False


@pytest.mark.usefixtures("two_cores")
def test_another_setup_gets_no_verdict() -> None:
    for args in (setup(clients=64), setup(engine_server="sim")):
        line, fields = throughput.share_line(0.95, args, phases=BOTH)
        assert fields["target_met"] is None and line.startswith("no verdict"), line
        assert throughput.target_line(5000.0, args, phases=CHAT)[1]["target_met"] is None
    sse = throughput.target_line(5000.0, setup(), "sse", phases=measured("sse"))
    assert sse[1]["target_met"] is None  # the 1,000 is the chat route's


@pytest.mark.usefixtures("two_cores")
def test_shorter_answers_get_no_verdict() -> None:
    """A 1-token answer (the bench's default) does a request's per-token work once instead of 16 times."""
    for max_tokens in (1, 8):
        line, fields = throughput.target_line(5000.0, setup(max_tokens=max_tokens), phases=CHAT)
        assert fields["target_met"] is None and line.startswith("no verdict"), line
        assert throughput.share_line(0.95, setup(max_tokens=max_tokens), phases=BOTH)[1]["target_met"] is None


@pytest.mark.usefixtures("two_cores")
def test_the_share_of_one_round_gets_no_verdict() -> None:
    """One round does not alternate the routes: the chat phase always first, on a freshly started serve."""
    line, fields = throughput.share_line(0.95, setup(rounds=1), phases=measured("chat", "sse", rounds=1))
    assert fields["target_met"] is None and line.startswith("no verdict"), line
    chat = throughput.target_line(1000.0, setup(rounds=1), phases=measured("chat", rounds=1))
    assert chat[1]["target_met"] is True  # the chat rate still is


def test_more_cores_get_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throughput, "cores", lambda: 4)
    assert throughput.share_line(0.95, setup(), phases=BOTH)[1]["target_met"] is None
    assert throughput.target_line(5000.0, setup(), phases=CHAT)[1]["target_met"] is None


@pytest.mark.usefixtures("two_cores")
def test_a_verdict_needs_the_measured_phases() -> None:
    """No figure is judged apart from the phases that measured it: the phases are a required argument."""
    for call in (lambda: throughput.target_line(1000.0, setup()), lambda: throughput.share_line(0.95, setup())):
        with pytest.raises(TypeError, match="phases"):
            call()
