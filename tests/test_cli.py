"""The command line: every command documents each flag once, with its environment variable and its
real default (never a second, argparse-made "(default: None)")."""

from __future__ import annotations

import argparse
import os
import re

import pytest

from sluicegate.cli import COMMANDS, build_parser, main
from sluicegate.settings import Settings


def test_each_flag_shows_its_variable_and_default_once() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    defaults = Settings()
    for command, (_, names) in COMMANDS.items():
        text = " ".join(commands[command].format_help().split())  # unwrap argparse's line breaks
        assert "(default: None)" not in text and "(default: )" not in text, command
        for name in names:
            assert f"[env SLUICEGATE_{name.upper()}]" in text, (command, name)
            default = 6379 if (command, name) == ("redis", "port") else getattr(defaults, name)  # Redis's own
            if default not in (None, "") and not isinstance(default, bool):
                assert text.count(f"(default: {default})") >= 1, (command, name)
    assert "(default: 8000)" in " ".join(commands["serve"].format_help().split())
    redis_port = next(a for a in commands["redis"]._actions if a.dest == "port")
    assert "(default: 6379)" in str(redis_port.help)  # what `sluicegate redis` listens on (it said 8000)


def test_every_setting_is_a_flag_of_serve_or_of_the_process_that_reads_it() -> None:
    """A setting the README names as a flag must be one (the deadline settings once were not)."""
    flags = {name for _, names in COMMANDS.values() for name in names}
    assert set(Settings.model_fields) - {"extra"} <= flags
    serve = set(COMMANDS["serve"][1])
    for name in ("deadline_horizon", "deadline_promote_window", "deadline_max_boost", "deadline_forecast_factor",
                 "fair_share_preemption", "fair_share_headroom"):
        assert name in serve and name in COMMANDS["scheduler"][1], name


def stderr_of(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, str]:
    """`sluicegate <argv>`'s exit code and stderr, with no SLUICEGATE_* variable of the shell."""
    for name in list(os.environ):
        if name.startswith("SLUICEGATE_"):
            monkeypatch.delenv(name)
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["scheduler", "api", "migrate"])
def test_a_command_without_heartbeats_takes_a_lease_below_the_default_heartbeat(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """The scheduler, the API and migrate take --lease-seconds but not --heartbeat-seconds (they never heartbeat):
    a lease below the default heartbeat (0.5 s) is no bad setting for them. Without --redis-url they stop at
    the next check, which shows the settings passed."""
    code, err = stderr_of(capsys, monkeypatch, [command, "--lease-seconds", "0.4"])
    assert "bad setting" not in err, err  # old: heartbeat_seconds: 0.5 must be less than --lease-seconds (0.4)
    assert code == 2 and err.startswith(f"sluicegate {command}: --redis-url is required"), err


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_lease_not_above_the_heartbeat_is_refused_naming_flags_the_command_takes(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    code, err = stderr_of(capsys, monkeypatch, [command, "--lease-seconds", "0.4"])
    assert code == 2 and err.startswith("sluicegate: bad setting: heartbeat_seconds: 0.5 must be less than "
                                        "--lease-seconds (0.4)"), err
    takes = {"--" + name.replace("_", "-") for name in COMMANDS[command][1]}
    assert set(re.findall(r"--[a-z-]+", err)) <= takes, err
