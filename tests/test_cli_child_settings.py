"""A --group no client could use is refused before anything starts; the `api` command's processes get
its resolved settings, never --config (which they would read again, edited or gone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sluicegate.embedded import free_port
from tests.helpers import ON_CLUSTER, ROOT, children, cmdline, healthy, stop_process, wait_for

NOWHERE = "redis://127.0.0.1:1/0"  # refused at once: a command that got past its settings exits 1 there


def sluicegate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    return subprocess.run([sys.executable, "-m", "sluicegate", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**clean, **env}, timeout=60, start_new_session=True)


@pytest.mark.parametrize(("args", "env"), [
    (["worker", "--group", "gpu a", "--redis-url", NOWHERE], {}),  # its CLIENT SETNAME would fail for ever
    (["serve", "--redis-url", NOWHERE, "--workers", "0"], {"SLUICEGATE_GROUP": "g" * 65}),  # every submit: 422
], ids=["space", "too-long"])
def test_a_group_name_no_client_can_use_is_refused(args: list[str], env: dict[str, str]) -> None:
    done = sluicegate(*args, **env)
    assert done.returncode == 2, done.stderr  # old: accepted, then exit 1 at the unreachable store
    assert done.stderr.startswith("sluicegate: bad setting: group: ") and done.stderr.count("\n") == 1, done.stderr
    assert "is not a group name (1-64 of A-Z a-z 0-9 . _ -)" in done.stderr


def test_api_processes_do_not_get_the_config_file(tmp_path: Path, redis_url: str) -> None:
    config = tmp_path / "api.toml"
    config.write_text("sse_ping_seconds = 3.0\n")
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "api", "--config", str(config), "--redis-url",
                             redis_url, "--port", str(port), "--api-processes", "2", "--log-level", "warning",
                             *(["--redis-cluster"] if ON_CLUSTER else [])],
                            cwd=ROOT, env=clean, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None, timeout=30, interval=0.2,
                 what="the API to answer")
        assert proc.poll() is None
        served = wait_for(lambda: [p for p in children(proc.pid) if "multiprocessing" in cmdline(p)], timeout=10,
                          what="the API's processes")
        for pid in served:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [item for item in environ if item.startswith(b"SLUICEGATE_CONFIG=")]  # old: the path
            assert b"SLUICEGATE_SSE_PING_SECONDS=3.0" in environ
    finally:
        stop_process(proc)
