"""What a bench verdict needs measured (loadtest/targets.py): a run too short to say anything gets "no verdict"
(None), a phase that completed nothing or failed is a miss whatever the figure, a setup DESIGN's row does not fix
(the lease, the tenants) gets no verdict, and nothing measured is no pass. Crafted inputs, no Redis, but for the
decision rows (a scratch Valkey) and a serve that fails to start (its process)."""

from __future__ import annotations

import argparse
import asyncio
import glob
import tempfile
from pathlib import Path
from typing import Any

import pytest
import redis

from sluicegate.loadtest import bench, common, plots
from sluicegate.loadtest.scenarios import cluster, decision, fairness, priority, recovery, resume, throughput, ttft
from tests.test_bench_ttft import nothing_starts

pytestmark = pytest.mark.single_server  # no Redis, or a server of its own: once is enough


# ---- throughput ------------------------------------------------------------------------------------------------
def design(mode: str = "both", rounds: int = 2, duration: float = 20.0) -> argparse.Namespace:
    return argparse.Namespace(clients=32, engine_server="sim-backend", mode=mode, max_tokens=16, rounds=rounds,
                              duration=duration, workers=1, slots=64, serve_flag=[], client="lean", warmup=1.0,
                              session_per_request=False)


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throughput, "cores", lambda: 2)


def phase(route: str, rnd: int, completed: int, seconds: float = 10.0, errors: int = 0) -> throughput.Phase:
    return throughput.Phase(route, rnd, completed, seconds, errors)


@pytest.mark.usefixtures("two_cores")
def test_a_phase_shorter_than_the_floor_gets_no_verdict() -> None:
    """The reviewer's 0.01 s run: 17 requests read as 1,075 req/s, "met"."""
    line, fields = throughput.target_line(1075.0, design("chat", 1), phases=[phase("chat", 1, 17, 0.0158)])
    assert fields["target_met"] is None and fields["setup_as_target"] is True
    assert line.startswith("no verdict: too short (the chat phase of round 1 measured 0.02 s"), line
    line, fields = throughput.share_line(0.95, design(), phases=[phase("chat", 1, 8000), phase("sse", 1, 7600, 4.0)])
    assert fields["target_met"] is None and line.startswith("no verdict: too short"), line
    # README's commands: 15 s alone, and 20 s over 2 rounds (10 s a phase, a timer a few ms early) are judged
    assert throughput.target_line(1000.0, design("chat", 1), phases=[phase("chat", 1, 15000, 15.0)])[1][
        "target_met"] is True
    ok = [phase(r, n, 8000, 9.97) for n in (1, 2) for r in ("chat", "sse")]
    assert throughput.share_line(0.95, design(), phases=ok)[1]["target_met"] is True


@pytest.mark.usefixtures("two_cores")
def test_a_phase_that_completed_nothing_or_failed_is_a_miss_whatever_the_share() -> None:
    """The reviewer's crash: serve killed as round 2 began; 95% from round 1 alone read "met"."""
    crashed = [phase("chat", 1, 3400), phase("sse", 1, 3200), phase("chat", 2, 0, errors=2189),
               phase("sse", 2, 0, errors=2496)]
    line, fields = throughput.share_line(0.95, design(), phases=crashed)
    assert fields["target_met"] is False and fields["verdict_reason"].startswith("the chat phase of round 2 "
                                                                                 "completed 0 requests")
    assert line.startswith("target >= 80% (MISSED: the chat phase of round 2 completed 0 requests (2189 failed)"), line
    few_errors = [phase("chat", 1, 10_000, errors=10), phase("sse", 1, 9_000, errors=9)]  # 0.1%: allowed
    assert throughput.share_line(0.9, design(), phases=few_errors)[1]["target_met"] is True
    too_many = [phase("chat", 1, 10_000, errors=11), phase("sse", 1, 9_000)]
    line, fields = throughput.target_line(1500.0, design("chat", 1), phases=too_many[:1])
    assert fields["target_met"] is False and "11 failed requests to 10000 completed" in line, line


def fake_out(completed: int, seconds: float, errors: int = 0) -> dict[str, Any]:
    return {"completed": completed, "seconds": seconds, "latencies": [0.05] * completed,
            "errors": ["RuntimeError: chat: 503"] * errors, "client_cpu": 0.1, "server_cpu": {"api": 0.1},
            "steal_percent": 0.0, "load_average": (1.0, 1.0)}


def run_sim_backend(monkeypatch: pytest.MonkeyPatch, args: argparse.Namespace,
                    outs: list[dict[str, Any]]) -> dict[str, Any]:
    """`run_sim_backend` with its processes replaced and each measured phase (direct first) given."""
    class Stub:
        pid = 1
        process = argparse.Namespace(pid=1)
        base_url = "http://127.0.0.1:1"

        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def start(self) -> Stub:
            return self

        def stop(self) -> None:
            pass

    queue = list(outs)
    written: dict[str, Any] = {}
    monkeypatch.setattr(common, "Component", Stub)
    monkeypatch.setattr(common, "wait_http", lambda *a, **k: None)
    monkeypatch.setattr(throughput, "ServeProcess", Stub)
    monkeypatch.setattr(throughput, "wait_model", lambda *a, **k: None)
    monkeypatch.setattr(throughput, "measure_on_loop", lambda *a, **k: queue.pop(0))
    monkeypatch.setattr(throughput, "write_result", lambda name, result: written.update(result))
    throughput.run_sim_backend(args)
    return written


@pytest.mark.usefixtures("two_cores")
def test_a_run_passes_its_phases_to_the_verdicts(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    crashed = run_sim_backend(monkeypatch, design(), [fake_out(20000, 10.0), fake_out(6800, 10.0),
                                                      fake_out(6400, 10.0), fake_out(0, 10.0, 2189),
                                                      fake_out(0, 10.0, 2496)])
    assert crashed["share_target_met"] is False and crashed["target_met"] is False
    assert [p["completed"] for p in crashed["phases"]] == [6800, 0, 6400, 0]
    assert "(MISSED: the chat phase of round 2 completed 0 requests" in capsys.readouterr().out
    short = run_sim_backend(monkeypatch, design("chat", 1, 0.01), [fake_out(30, 0.0134), fake_out(17, 0.0158)])
    assert short["target_met"] is None and short["setup_as_target"] is True
    assert "no verdict: too short" in capsys.readouterr().out


# ---- priority --------------------------------------------------------------------------------------------------
def high(ttft_p99: float, wait_p99: float, sampled: int = 120, not_started: int = 0,
         no_first_token: int = 0) -> dict[str, Any]:
    return {"ttft_p99_ms": ttft_p99, "wait_p99_ms": wait_p99, "sampled": sampled, "not_started": not_started,
            "no_first_token": no_first_token}


def test_the_wait_is_judged_as_design_states_it_beside_the_ttft_ratio() -> None:
    """The reviewer's --prefill-ms 4000 run: the wait went 0 -> 814 ms, but the prefill diluted the TTFT ratio
    to 1.04, which alone read as met."""
    v = priority.overload_verdict({0.5: high(4003.0, 0.0), 3.0: high(4152.0, 813.9)}, 0.5, 3.0, 30.0)
    assert v["ttft_met"] is True and v["wait_met"] is False and v["met"] is False
    assert v["wait_limit_ms"] == pytest.approx(1.2)  # 1.2 x the 1 ms resolution, the 0.5x wait being 0
    line = priority.verdict_line(v, "0.5", "3.0")
    assert "wait p99 at 3.0x 813.9 ms" in line and "-> MISSED; TTFT p99" in line and line.endswith("MISSED")
    assert priority.overload_verdict({0.5: high(22.0, 0.0), 3.0: high(23.0, 1.1)}, 0.5, 3.0, 30.0)["met"] is True
    assert priority.overload_verdict({0.5: high(22.0, 0.0), 3.0: high(23.0, 1.3)}, 0.5, 3.0, 30.0)["met"] is False
    assert priority.overload_verdict({0.5: high(22.0, 10.0), 3.0: high(23.0, 12.0)}, 0.5, 3.0, 30.0)["met"] is True
    # nothing looser than before: the TTFT ratio still decides when the wait holds
    assert priority.overload_verdict({0.5: high(22.0, 0.0), 3.0: high(30.0, 0.0)}, 0.5, 3.0, 30.0)["met"] is False
    stranded = {0.5: high(22.0, 0.0), 3.0: high(22.0, 0.0, no_first_token=1)}
    assert priority.overload_verdict(stranded, 0.5, 3.0, 30.0)["met"] is False


def test_a_priority_run_too_short_gets_no_verdict() -> None:
    """The reviewer's 4 s run: 18 high-priority requests at 0.5x."""
    v = priority.overload_verdict({0.5: high(22.1, 0.0, sampled=18), 3.0: high(23.1, 0.0, sampled=96)}, 0.5, 3.0,
                                  30.0)
    assert v["met"] is None and v["reason"] == ("too short (18 high-priority requests at 0.5x; a verdict needs >= 50 "
                                                "at each level)")
    assert "verdict -> no verdict: too short" in priority.verdict_line(v, "0.5", "3.0")
    v = priority.overload_verdict({0.5: high(22.1, 0.0), 3.0: high(23.1, 0.0)}, 0.5, 3.0, 4.0)
    assert v["met"] is None and v["reason"].startswith("too short (4 s a level")
    assert priority.overload_verdict({0.5: high(22.0, 0.0), 1.5: high(22.0, 0.0)}, 0.5, 1.5, 30.0)["met"] is None


def test_results_are_read_back_after_the_prefill_and_a_token() -> None:
    args = argparse.Namespace(prefill_ms=4000.0, tokens_per_second=50.0)
    assert priority.settle_seconds(args) >= 4.0 + 0.02
    assert priority.settle_seconds(argparse.Namespace(prefill_ms=20.0, tokens_per_second=50.0)) >= 2.0


def test_no_plot_keeps_the_tracked_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[str] = []
    monkeypatch.setattr(plots, "priority_wait", lambda *a, **k: drawn.append("priority"))
    monkeypatch.setattr(plots, "fairness_share", lambda *a, **k: drawn.append("fairness"))
    monkeypatch.setattr(priority, "write_result", lambda name, result: None)
    monkeypatch.setattr(fairness, "write_result", lambda name, result: None)
    rows = {0.5: high(22.0, 0.0), 3.0: high(23.0, 0.0)}
    summary = {"capacity_per_s": 80.0, "slots": 16, "rows": [], "verdict": priority.overload_verdict(rows, 0.5, 3.0,
                                                                                                     30.0),
               "high_wait_p99_ms": {}, "submit_errors": {}}

    async def prio_measured(args: argparse.Namespace) -> dict[str, Any]:
        return {"ii": {"summary": summary, "series": {}, "boundaries": []}}

    fair_run = {"estimate_ratio": 1.0, "seconds": 90.0, "requests": 10, "tenants": [], "max_deviation": 0.0,
                "window_seconds": 60.0, "worst_window_deviation": 0.0, "jain": 1.0, "longest_gap_s": 0.1,
                "max_wait_s": 1.0, "class_max_wait_s": 60.0, "submit_errors": 0, "targets_ok": {}, "checks_ok": {},
                "plot": {"times": [], "shares": {}, "targets": {}}}

    async def fair_measured(args: argparse.Namespace) -> list[dict[str, Any]]:
        return [fair_run]

    monkeypatch.setattr(priority, "scenario", prio_measured)
    monkeypatch.setattr(fairness, "scenario", fair_measured)
    for module in (priority, fairness):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        module.run(parser.parse_args(["--no-plot"]))
    assert drawn == []


# ---- recovery, resume, ttft ------------------------------------------------------------------------------------
def test_recovery_judges_only_the_default_lease_over_enough_kills() -> None:
    """The reviewer's runs: one kill, and a 0.6 s lease (0.52 s to resume), both read "met"."""
    assert recovery.recovery_verdict(2.6, 1, 2.5, 0.5) == (None, "too short (1 kill; a verdict needs >= 8)")
    met, why = recovery.recovery_verdict(0.52, 8, 0.6, 0.2)
    assert met is None and why.startswith("DESIGN's figure is for the default lease 2.5 s and heartbeat 0.5 s")
    assert recovery.recovery_verdict(2.5, 8, 2.5, 0.5) == (True, "")
    assert recovery.recovery_verdict(3.1, 8, 2.5, 0.5) == (False, "")
    parser = argparse.ArgumentParser()
    recovery.add_arguments(parser)
    assert parser.parse_args([]).rounds >= 8  # the bare command still gets a verdict


def test_resume_needs_a_hundred_reconnects_a_case() -> None:
    rows = [{"request": "finished", "stream": s, "reconnects": 20, "p99_ms": 2.4} for s in ("request", "session")]
    assert resume.resume_verdict(rows) == (None, "too short (the finished/request case had 20 reconnects; a p99 "
                                                 "needs >= 100)")
    assert resume.resume_verdict([{**r, "reconnects": 1200} for r in rows]) == (True, "")
    assert resume.resume_verdict([{**rows[0], "reconnects": 1200, "p99_ms": 5.2}]) == (False, "")


def test_ttft_needs_a_hundred_requests_a_way() -> None:
    fast = {"p50_ms": 0.5, "p99_ms": 1.0, "paired_p50_ms": 0.5, "paired_p99_ms": 1.0}
    verdicts, why = ttft.added_verdict(fast, 17)
    assert verdicts == {"p50_target_met": None, "p99_target_met": None} and why.startswith("too short (17 requests")
    assert ttft.added_verdict(fast, 100) == ({"p50_target_met": True, "p99_target_met": True}, "")
    assert ttft.added_verdict({**fast, "paired_p99_ms": 3.5}, 400)[0]["p99_target_met"] is False


# ---- decision --------------------------------------------------------------------------------------------------
def decision_row(**changes: Any) -> dict[str, Any]:
    return {"queued": 1_000_000, "group_queued": 1_000_000, "queued_after": 1_000_000, "samples": 3000,
            "dispatched": 3000, "p50_ms": 0.2, "p99_ms": 0.6, "max_ms": 1.0, "tenants": 1000, "groups": 1, **changes}


def test_decision_judges_only_a_thousand_tenants_and_enough_samples(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert decision.size_verdict(decision_row()) == (True, "")
    assert decision.size_verdict(decision_row(tenants=1)) == (
        None, "DESIGN's row is for 1,000 tenants; this run had 1 (--tenants)")
    assert decision.size_verdict(decision_row(samples=50, dispatched=50)) == (
        None, "too short (50 samples; a p99 needs >= 100)")
    assert decision.size_verdict(decision_row(p99_ms=1.5)) == (False, "p99 1.500 ms > 1 ms")

    async def measured(args: argparse.Namespace) -> dict[str, Any]:
        return {"rows": [decision_row(queued=100_000, group_queued=100_000, queued_after=100_000, tenants=1,
                                      samples=200, dispatched=200)]}

    monkeypatch.setattr(decision, "scenario", measured)
    monkeypatch.setattr(decision, "write_result", lambda name, result: None)
    got = decision.run(argparse.Namespace(no_plot=True))["targets"]
    assert got["p99_at_100k_ok"] is None and got["p99_at_100k_miss"] is None
    assert got["p99_at_100k_no_verdict"] == "DESIGN's row is for 1,000 tenants; this run had 1 (--tenants)"
    assert "at 100k: no verdict: DESIGN's row is for 1,000 tenants" in capsys.readouterr().out


@pytest.mark.own_servers
def test_decision_rows_record_their_tenants_and_groups() -> None:
    parser = argparse.ArgumentParser()
    decision.add_arguments(parser)
    args = parser.parse_args(["--sizes", "200", "--samples", "20", "--tenants", "10", "--concurrency", "8"])
    got = asyncio.run(decision.scenario(args))["rows"][0]
    assert (got["tenants"], got["groups"]) == (10, 1)
    assert decision.size_verdict(got)[0] is None


def test_the_decision_plot_names_the_runs_own_tenants_and_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    labels: list[str] = []

    def save(plt: Any, fig: Any, name: str) -> Path:
        labels.append(fig.axes[0].get_xlabel())
        plt.close(fig)
        return Path(name)

    monkeypatch.setattr(plots, "_save", save)
    plots.decision_cost([decision_row()], tenants=1000, groups=1)
    plots.decision_cost([decision_row()], tenants=10, groups=4)
    assert labels == ["queued requests (1,000 tenants, 1 group)", "queued requests (10 tenants, 4 groups)"]


# ---- cluster ---------------------------------------------------------------------------------------------------
def test_a_cluster_run_that_measured_nothing_fails(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The reviewer's `--sessions 1 --requests-per-session 0`: 0 requests, 0 tokens, "-> met"."""
    written: dict[str, Any] = {}
    monkeypatch.setattr(cluster, "write_result", lambda name, result: written.update(result))
    parser = argparse.ArgumentParser()
    cluster.add_arguments(parser)
    args = parser.parse_args(["--sessions", "1", "--requests-per-session", "0"])
    nodes = [cluster.Master(i, 7000 + i, redis.Redis(), []) for i in range(3)]
    zero = [{"cpu": 0.0, "fcall": 0, "tokens": 0} for _ in nodes]
    with pytest.raises(SystemExit):
        cluster.report(args, cluster.Tally(), 0.001, nodes, zero, zero, [3, 3, 3], {}, 0.01, 32)
    assert written["targets"]["met"] is False
    assert any(f.startswith("nothing measured: 0 requests, 0 tokens") for f in written["failures"])
    assert "FAILED: nothing measured" in capsys.readouterr().out


# ---- ttft --against, ServeProcess ------------------------------------------------------------------------------
def scratch_dirs() -> set[str]:
    return set(glob.glob(str(Path(tempfile.gettempdir()) / "sg-bench-*")))


def test_against_a_dir_that_is_no_checkout_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The reviewer's DIR: a .venv (a link to a python) and nothing else; serve exited, a traceback followed and
    /tmp/sg-bench-* stayed."""
    fake = tmp_path / "fake"
    (fake / ".venv" / "bin").mkdir(parents=True)
    (fake / ".venv" / "bin" / "python").write_text("")
    with pytest.raises(common.CheckoutRefused, match="is not a checkout of sluicegate"):
        common.sluicegate_checkout(fake)
    (fake / "pyproject.toml").write_text('[project]\nname = "other"\n')
    with pytest.raises(common.CheckoutRefused, match="names the project 'other'"):
        common.sluicegate_checkout(fake)
    common.sluicegate_checkout(common.ROOT)  # this tree passes

    started = nothing_starts(monkeypatch)
    before = scratch_dirs()
    assert bench.main(["ttft", "--against", str(fake)]) == 2
    assert not started and scratch_dirs() <= before
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sluicegate bench ttft: {fake} is not a checkout"), err


def test_a_serve_that_fails_to_start_leaves_no_data_dir() -> None:
    serve = common.ServeProcess(flags=["--no-such-flag"])
    with pytest.raises(RuntimeError, match="serve exited"):
        serve.start(timeout=30)
    assert serve.data_dir and not Path(serve.data_dir).exists()
