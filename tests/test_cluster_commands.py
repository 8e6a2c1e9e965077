"""The embedded cluster from the command line: `sluicegate redis --cluster 3` prints its seed URL and
stops on Ctrl-C; `sluicegate serve --embedded-cluster 3` runs the whole stack on one and serves a
stream end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sluicegate.embedded import free_port, free_port_block
from sluicegate.sessions.connect import check_redis
from tests.helpers import ROOT, healthy, sse, submit, wait_for

pytestmark = pytest.mark.own_servers  # clusters of their own


def _start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    return subprocess.Popen([sys.executable, "-m", "sluicegate", *args], stdout=subprocess.PIPE,
                            stderr=open(log, "wb"), cwd=ROOT, env=env, start_new_session=True)  # noqa: SIM115


def test_redis_cluster_prints_its_seed_url_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port_block(3)
    proc = _start("redis", "--cluster", "3", "--port", str(port), "--data-dir", str(tmp_path / "c"),
                  log=tmp_path / "redis.log")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        url = urlsplit(line)
        log = (tmp_path / "redis.log").read_text()
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, "/0"), (line, log)
        assert url.password and (tmp_path / "c" / "redis.url").read_text().strip() == line  # generated, kept 0600
        assert (tmp_path / "c" / "redis.url").stat().st_mode & 0o777 == 0o600
        check_redis(line, cluster=True)  # three masters, every slot covered
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        leftover = subprocess.run(["pgrep", "-f", f"valkey-server .*:{port}"], capture_output=True, text=True)
        assert not leftover.stdout.strip(), "a cluster node outlived Ctrl-C"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_on_an_embedded_cluster_streams_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    proc = _start("serve", "--embedded-cluster", "3", "--port", str(port), "--data-dir", str(tmp_path / "d"),
                  "--workers", "1", "--sim-tokens-per-second", "500", "--log-level", "warning",
                  log=tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(base), timeout=60, interval=0.5, what="serve on a cluster to answer")
        rid = submit(base, "on-a-cluster", max_tokens=12)
        events = list(sse(base, f"/v1/requests/{rid}/events", timeout=30))
        assert events[-1].event == "done", (tmp_path / "serve.log").read_text()[-2000:]
        assert [e.data["index"] for e in events if e.event == "token"] == list(range(12))
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(40) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

