"""A top-level `engine = "openai"` (or SLUICEGATE_ENGINE=openai, or --engine openai) with `[groups.NAME]` tables
that each give their own `backend_url` is a valid config: a top-level key only fills in for the tables that do
not say, so the openai engine's backend_url is checked per group, and a group left without one is refused naming
it. The commands that read no tables (`worker`) still need --backend-url with the openai engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from sluicegate.cli import main
from sluicegate.embedded import free_port
from sluicegate.workers.sim_backend import create_sim_backend
from tests.helpers import ROOT, healthy, wait_for
from tests.openai_helpers import ServerThread

PER_GROUP_URLS = """
[groups.a]
model = "model-a"
backend_url = "http://127.0.0.1:8001/v1"

[groups.b]
model = "model-b"
backend_url = "http://127.0.0.1:8002/v1"
"""


pytestmark = pytest.mark.usefixtures("no_sluicegate_env")


def serve_would_run(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, dict[str, Any]]:
    """`sluicegate <argv>`'s exit code, and what serve would have been given had it started (nothing starts)."""
    given: dict[str, Any] = {}

    def fake_serve(settings: Any, groups: Any) -> int:
        given.update(settings=settings, groups=groups)
        return 0

    monkeypatch.setattr("sluicegate.serve.serve", fake_serve)
    return main(argv), given


@pytest.mark.parametrize("source", ["file", "variable", "flag"])
def test_a_top_level_openai_engine_with_a_backend_url_in_every_table_is_accepted(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, source: str) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(('engine = "openai"\n' if source == "file" else "") + PER_GROUP_URLS)
    if source == "variable":
        monkeypatch.setenv("SLUICEGATE_ENGINE", "openai")
    argv = ["serve", "--config", str(config), *(["--engine", "openai"] if source == "flag" else [])]
    code, given = serve_would_run(monkeypatch, argv)
    assert code == 0, capsys.readouterr().err  # old: 2, "backend_url: the openai engine needs --backend-url"
    pools = {group.name: group.worker_settings(given["settings"]) for group in given["groups"]}
    assert {name: (pool.engine, pool.backend_url) for name, pool in pools.items()} == {
        "a": ("openai", "http://127.0.0.1:8001/v1"), "b": ("openai", "http://127.0.0.1:8002/v1")}


def test_a_group_left_without_a_backend_url_is_refused_naming_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text('engine = "openai"\n' + PER_GROUP_URLS + '\n[groups.c]\nmodel = "model-c"\n')
    code, given = serve_would_run(monkeypatch, ["serve", "--config", str(config)])
    assert code == 2 and not given
    assert capsys.readouterr().err.splitlines() == [
        f'sluicegate: bad setting: groups.c: engine = "openai" needs backend_url (e.g. http://127.0.0.1:8001/v1), '
        f'in {config}']


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_without_tables_read_the_openai_engine_still_needs_a_backend_url(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
    """serve without tables, and a worker (which reads no tables, whatever the file holds), run the top-level
    engine themselves."""
    config = tmp_path / "one.toml"
    config.write_text('engine = "openai"\n' + (PER_GROUP_URLS if command == "worker" else ""))
    code, given = serve_would_run(monkeypatch, [command, "--config", str(config)])
    assert code == 2 and not given
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith("sluicegate: bad setting: backend_url: the openai engine needs --backend-url"), line


@pytest.mark.own_servers
def test_serve_runs_groups_that_each_give_their_backend_url_under_a_top_level_openai_engine(tmp_path: Path) -> None:
    """End to end: serve's scheduler and API get the top-level engine too, and must start with it."""
    backend = ServerThread(create_sim_backend(tokens_per_second=500, prefill_ms=0, model="backend-side")).start()
    config = tmp_path / "fleet.toml"
    config.write_text(f'engine = "openai"\nbackend_probe = false\nslots = 2\nworkers = 1\n'
                      f'[groups.a]\nmodel = "model-a"\nbackend_url = "{backend.url}"\n'
                      f'[groups.b]\nmodel = "model-b"\nbackend_url = "{backend.url}"\n')
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "serve", "--config", str(config), "--port",
                             str(port), "--data-dir", str(tmp_path / "data")],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115
                            start_new_session=True)
    try:
        wait_for(lambda: healthy(base) or proc.poll() is not None, timeout=60, interval=0.3, what="serve to answer")
        assert proc.poll() is None, log.read_text()[-3000:]  # old: exit 2 before anything started
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
        wait_for(lambda: sorted(m.id for m in client.models.list().data) == ["model-a", "model-b"], timeout=30,
                 interval=0.3, what="both groups' workers live")
        for model in ("model-a", "model-b"):
            completion = client.chat.completions.create(model=model, max_tokens=3,
                                                        messages=[{"role": "user", "content": "hi"}])
            assert completion.model == model and completion.choices[0].message.content
        assert proc.poll() is None, log.read_text()[-3000:]  # the scheduler and the API run on
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        backend.stop()
