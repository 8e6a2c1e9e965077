"""Bounds of `serve`'s settings and `--config` file: `workers` has a cap per group and in all (a typo such as
100000 is one line and exit 2, not tens of thousands of processes); a number setting refuses TOML's
true/false (not 1/0); `groups = 3` and `[[groups]]` are told how to write groups, and two groups given one model
by `--backend-model` are told so (not blamed on the file); serve stops promptly when a stop signal comes while
its workers start, and warns when no worker serves `default`, where a call without `model` goes.

The refusals are read through settings_from/load_groups, never `main(["serve"])`: on a tree that accepts the
values that would start a whole stack, with as many workers as asked. serve itself runs here in-process with
its children replaced by `sleep` processes: what is checked is how many it starts and when it stops."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate import serve as serve_module
from sluicegate.embedded import STOP_SIGNALS, free_port
from sluicegate.settings import BadSetting, Settings
from tests.helpers import ON_CLUSTER
from tests.test_config_groups import groups_of

pytestmark = pytest.mark.usefixtures("no_sluicegate_env")


def refused(tmp_path: Path, text: str, *argv: str) -> str:
    """The BadSetting line (the CLI prints it after `sluicegate: bad setting: ` and exits 2), FILE for the path."""
    with pytest.raises(BadSetting) as problem:
        groups_of(tmp_path, text, *argv)
    return str(problem.value).replace(str(tmp_path / "sluicegate.toml"), "FILE")


# ---- 1. workers: a cap per group and in all ----------------------------------------------------------

@pytest.mark.parametrize(("text", "argv", "line"), [
    ("", ("--workers", "100000"),
     "workers: Input should be less than or equal to 64, got '100000' (from --workers)"),
    ("workers = 100000\n", (), "workers: Input should be less than or equal to 64, got 100000 (from FILE)"),
    ("[groups.a]\nworkers = 100000\n", (),
     "groups.a.workers: Input should be less than or equal to 64, got 100000, in FILE"),
    ("[groups.a]\nworkers = 65\n", (), "groups.a.workers: Input should be less than or equal to 64, got 65, in FILE"),
])
def test_workers_above_the_cap_are_refused(tmp_path: Path, text: str, argv: tuple[str, ...], line: str) -> None:
    assert refused(tmp_path, text, *argv) == line  # old: accepted, and serve started them all


def test_the_cap_also_bounds_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_WORKERS", "100000")
    assert refused(tmp_path, "") == ("workers: Input should be less than or equal to 64, got '100000' "
                                     "(from SLUICEGATE_WORKERS)")


def test_the_workers_of_all_groups_together_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    five = "".join(f"[groups.g{n}]\nworkers = 60\n" for n in range(5))
    assert refused(tmp_path, five) == ("workers: the groups of FILE have 300 workers in all (g0 60, g1 60, g2 60, "
                                       "g3 60, g4 60); serve starts at most 256")  # old: accepted
    monkeypatch.setenv("SLUICEGATE_WORKERS", "60")  # explicit: every group's, over their tables
    assert refused(tmp_path, five.replace("60", "1")).startswith("workers: the groups of FILE have 300 workers")
    monkeypatch.delenv("SLUICEGATE_WORKERS")
    four = "".join(f"[groups.g{n}]\nworkers = 64\n" for n in range(4))
    settings, groups = groups_of(tmp_path, four)  # 256 in all: the most
    assert [group.worker_settings(settings).workers for group in groups] == [64] * 4
    settings, groups = groups_of(tmp_path, "workers = 64\n[groups.a]\n[groups.b]\nworkers = 0\n")
    assert [group.worker_settings(settings).workers for group in groups] == [64, 0]


# ---- 2. a number setting refuses true/false ------------------------------------------------------------

@pytest.mark.parametrize(("text", "line"), [
    ("session_ttl = true\n", "session_ttl: a number, not a boolean (from FILE)"),
    ("workers = true\n", "workers: a number, not a boolean (from FILE)"),
    ("backend_timeout = false\n", "backend_timeout: a number, not a boolean (from FILE)"),
    ("fair_share_headroom = false\n", "fair_share_headroom: a number, not a boolean (from FILE)"),
    ("[groups.a]\nworkers = true\n", "groups.a.workers: a number, not a boolean, in FILE"),
    ("[groups.a]\nslots = true\n", "groups.a.slots: a number, not a boolean, in FILE"),
    ("[groups.a]\nbackend_timeout = true\n", "groups.a.backend_timeout: a number, not a boolean, in FILE"),
    ("[groups.a]\nsim_tokens_per_second = true\n",
     "groups.a.sim_tokens_per_second: a number, not a boolean, in FILE"),
])
def test_a_number_setting_refuses_a_boolean(tmp_path: Path, text: str, line: str) -> None:
    assert refused(tmp_path, text) == line  # old: true was 1 (every session expired after 1 s), false 0


def test_yes_no_settings_still_take_booleans(tmp_path: Path) -> None:
    settings, groups = groups_of(tmp_path, "password = false\naccess_log = true\nauth = false\n"
                                           "[groups.a]\nbackend_probe = false\nworkers = 0\n")
    assert (settings.password, settings.access_log, settings.auth) == (False, True, False)
    assert groups[0].worker_settings(settings).backend_probe is False
    assert Settings(slots=None, workers=0).slots is None  # numbers themselves are as before


# ---- 3. messages ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["groups = 3\n", "[[groups]]\nmodel = 'm'\n", "groups = ['a', 'b']\n"])
def test_groups_not_as_tables_is_told_how_to_write_them(tmp_path: Path, text: str) -> None:
    line = refused(tmp_path, text)
    assert line == ("groups: give one table [groups.NAME] per group, each with its keys (e.g. [groups.a] then "
                    "workers = 2), in FILE")  # old: "not a setting, in FILE (did you mean `group`?)"


def test_one_model_for_two_groups_from_the_flag_blames_the_flag(tmp_path: Path) -> None:
    text = "[groups.a]\nmodel = 'ma'\n[groups.b]\nmodel = 'mb'\n"
    line = refused(tmp_path, text, "--backend-model", "zz")
    assert line == ("groups.b.model: `zz` is also the model of [groups.a], both from --backend-model (or "
                    "SLUICEGATE_BACKEND_MODEL) (a bare name is every group's model: give GROUP=MODEL,...): chat "
                    "requests choose a group by model, so each model has one group")  # old: "..., in FILE: ..."
    line = refused(tmp_path, text, "--backend-model", "a=mb")
    assert line == ("groups.b.model: `mb` is also the model of [groups.a], [groups.a]'s from --backend-model (or "
                    "SLUICEGATE_BACKEND_MODEL), [groups.b]'s from [groups.b] of FILE: chat requests choose a group "
                    "by model, so each model has one group")
    line = refused(tmp_path, "[groups.a]\nmodel = 'm'\n[groups.b]\nmodel = 'm'\n")  # the file's own: as before
    assert line == ("groups.b.model: `m` is also the model of [groups.a], in FILE: chat requests choose a group by "
                    "model, so each model has one group")


# ---- serve: a stop while its workers start, and no worker for `default` ---------------------------------

@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """serve's children as `sleep` processes (role, process), in start order; this process's stop handlers put
    back after serve set its own; every one of them killed at the end, whatever failed."""
    started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(role: str, _settings: Settings, *_extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
        started.append((role, proc))
        return proc

    monkeypatch.setattr(serve_module, "spawn", spawn)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        yield started
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for _, proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def stop_at(children: list[tuple[str, subprocess.Popen[bytes]]], role: str, nth: int,
            monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM to serve (this process) as its nth child of `role` starts: a stop during start-up."""
    spawn = serve_module.spawn

    def spawn_then_stop(child_role: str, settings: Settings, *extra: str) -> subprocess.Popen[bytes]:
        proc = spawn(child_role, settings, *extra)
        if child_role == role and sum(r == role for r, _ in children) == nth:
            os.kill(os.getpid(), signal.SIGTERM)
        return proc

    monkeypatch.setattr(serve_module, "spawn", spawn_then_stop)


def test_a_stop_while_the_workers_start_starts_no_more_and_stops_those_started(
        children: list[tuple[str, subprocess.Popen[bytes]]], monkeypatch: pytest.MonkeyPatch) -> None:
    stop_at(children, "worker", 3, monkeypatch)
    settings = Settings(redis_url="redis://127.0.0.1:1", port=free_port(), workers=20, shutdown_grace_seconds=1)
    assert serve_module.serve(settings) == 0
    workers = [proc for role, proc in children if role == "worker"]
    assert len(workers) == 3  # old: 20, every one started before the stop was looked at
    assert all(proc.poll() is not None for _, proc in children)  # each one stopped, none left running


def test_serve_warns_when_no_worker_serves_the_default_group(
        children: list[tuple[str, subprocess.Popen[bytes]]], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, tmp_path: Path, redis_url: str) -> None:
    stop_at(children, "scheduler", 1, monkeypatch)
    _, groups = groups_of(tmp_path, "[groups.cb-fast]\nmodel = 'cb-m1'\nworkers = 1\n"
                                    "[groups.cb-idle]\nworkers = 0\n[groups.cb-big]\nmodel = 'cb-m2'\nworkers = 1\n")
    settings = Settings(redis_url=redis_url, redis_cluster=ON_CLUSTER, port=free_port(), config="fleet.toml")
    with caplog.at_level(logging.WARNING, logger="sluicegate.serve"):
        assert serve_module.serve(settings, groups) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["no workers for group default (this serve's groups with workers: cb-fast, cb-big): a chat "
                        "call without `model` or a submit without `group` goes to default and waits until a worker "
                        "of it runs elsewhere"]  # old: no warning; such a call waited for ever
    caplog.clear()
    _, groups = groups_of(tmp_path, "[groups.default]\nworkers = 1\n[groups.cb-other]\nmodel = 'cb-m3'\n")
    stop_at(children, "scheduler", 2, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="sluicegate.serve"):
        assert serve_module.serve(settings.replace(port=free_port()), groups) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # `default` has its worker: no warning
