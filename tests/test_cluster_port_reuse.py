"""`sluicegate redis --cluster N` (here 3) restarted on its data dir without `--port` comes back on the ports the
data dir's cluster holds, with its data (not a new, empty cluster on 6379); a different named port is
refused with a clear error instead of starting a second cluster beside the first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from sluicegate.embedded import free_port_block
from tests.helpers import ROOT

pytestmark = pytest.mark.own_servers


def run_redis(data_dir: Path, *flags: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    return subprocess.Popen([sys.executable, "-m", "sluicegate", "redis", "--cluster", "3", "--data-dir",
                             str(data_dir), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=env, start_new_session=True)


def seed_url(proc: subprocess.Popen[bytes]) -> str:
    """The URL it prints once the cluster is ok; '' if it exited first."""
    assert proc.stdout is not None
    return proc.stdout.readline().decode().strip()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def test_restart_without_port_reuses_the_clusters_ports_and_a_different_port_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    port = free_port_block(3)
    first = run_redis(data, "--port", str(port))
    try:
        url = seed_url(first)
        assert urlsplit(url).port == port
        with redis.RedisCluster.from_url(url) as node:
            node.set("kept", "yes")
    finally:
        stop(first)

    again = run_redis(data)  # no --port: not 6379, the data dir's own
    try:
        url = seed_url(again)
        assert urlsplit(url).port == port
        with redis.RedisCluster.from_url(url) as node:
            assert node.get("kept") == b"yes"
    finally:
        stop(again)

    other = run_redis(data, "--port", str(port + 1))
    try:
        try:
            _, err = other.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("started a second cluster on another port instead of refusing")
        assert other.returncode == 2  # a refusal before anything starts, as a bad setting: not a store that died
        assert f"holds a cluster on ports {port}-{port + 2}" in err.decode() and f"--port {port}" in err.decode()
    finally:
        stop(other)

