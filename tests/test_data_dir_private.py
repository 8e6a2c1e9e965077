"""The embedded store's data dir is its owner's alone: the AOF holds every prompt and output and the secret
that signs stream tokens (api/stream_tokens.py). Under a umask of 022, the dir (and a cluster's node dirs)
is 0700 and nothing the server writes there (appendonlydir/, the AOF files, nodes.conf, the logs) is
readable by group or others; an existing dir of ours is tightened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sluicegate.embedded import EmbeddedCluster, EmbeddedServer, free_port
from tests.helpers import ROOT, wait_for

pytestmark = pytest.mark.own_servers

SECRET = "deadbeef" * 8


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The common default umask: files 0644, dirs 0755 unless the code asks for less."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def exposed(root: Path) -> list[str]:
    """Every path under root (root included) that its group or others may read, write or enter."""
    paths = [root, *root.rglob("*")]
    return [f"{oct(path.lstat().st_mode & 0o777)} {path}" for path in paths if path.lstat().st_mode & 0o077]


def write_and_flush(client: redis.Redis) -> None:
    client.set("sg:stream-token-secret", SECRET)
    client.set("prompt", "tenant acme's confidential prompt")
    client.execute_command("BGREWRITEAOF")  # a base file too, not only the incr file
    wait_for(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0, timeout=10,
             what="the AOF rewrite")


def aof_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("appendonlydir/*") if path.is_file()]


def test_server_data_dir_and_aof_are_private(tmp_path: Path, loose_umask: None) -> None:
    data = tmp_path / "new" / "valkey"
    server = EmbeddedServer(data_dir=str(data), appendfsync="always", password="pw").start()
    try:
        with redis.Redis.from_url(server.url) as client:
            write_and_flush(client)
    finally:
        server.stop()
    assert aof_files(data), "the server wrote no AOF"
    assert exposed(data) == []


def test_cli_redis_tightens_an_existing_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "redis", "--port", str(free_port()),
                             "--data-dir", str(data), "--appendfsync", "always"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=ROOT, env=env, start_new_session=True, umask=0o022)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        wait_for(lambda: _answers(client), timeout=15, what="the server to answer")
        write_and_flush(client)
        client.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    assert aof_files(data), "the server wrote no AOF"
    assert exposed(data) == []


def test_cluster_node_dirs_are_private(tmp_path: Path, loose_umask: None) -> None:
    data = tmp_path / "cluster"
    cluster = EmbeddedCluster(data_dir=str(data), masters=1, appendfsync="always", password="pw").start()
    try:
        with cluster.client(0) as client:
            write_and_flush(client)
    finally:
        cluster.stop()
    assert aof_files(data) and list(data.glob("node-*/nodes.conf"))
    assert exposed(data) == []


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.BusyLoadingError):
        return False
