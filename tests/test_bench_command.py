"""A result file's `command` is the command line to paste again, however the bench was started."""

from __future__ import annotations

import sys

import pytest

from sluicegate.loadtest import common

pytestmark = pytest.mark.single_server  # no Redis: once is enough


@pytest.mark.parametrize(("argv0", "args", "command"), [
    ("/work/x/sluicegate/__main__.py", ["bench", "ttft", "--rounds", "300"],
     "python -m sluicegate bench ttft --rounds 300"),
    ("/work/x/loadtest/bench.py", ["ttft", "--modes", "a b"], "python -m sluicegate.loadtest.bench ttft --modes 'a b'"),
    ("/work/x/.venv/bin/sluicegate", ["bench", "decision"], "sluicegate bench decision"),
])
def test_the_command_names_how_the_bench_was_started(monkeypatch: pytest.MonkeyPatch, argv0: str, args: list[str],
                                                     command: str) -> None:
    monkeypatch.setattr(sys, "argv", [argv0, *args])
    assert common.invoked_command() == command
