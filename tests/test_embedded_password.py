"""The embedded Valkey is password-protected (issue 12): `sluicegate redis` generates a password into
its data dir, writes DATA_DIR/redis.url (mode 0600) and prints that URL; a restart keeps it; a client
without it is refused; `--no-password` turns it off. serve wires it through to its children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from sluicegate.embedded import free_port
from tests.helpers import ROOT, wait_for

pytestmark = pytest.mark.own_servers


def start_redis(data_dir: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "redis", "--port", str(free_port()), "--data-dir",
                             str(data_dir), *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env=env, start_new_session=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().decode().strip()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.exceptions.ConnectionError:
        return False


def test_redis_generates_a_password_keeps_it_and_refuses_clients_without_it(tmp_path: Path) -> None:
    proc, url = start_redis(tmp_path / "d")
    try:
        parts = urlsplit(url)
        assert parts.password and len(parts.password) >= 24
        stored = tmp_path / "d" / "redis.url"
        assert stored.read_text().strip() == url and stored.stat().st_mode & 0o777 == 0o600
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert parts.password not in argv  # not in argv, where `ps` shows it (the exec'd server's own)
        wait_for(lambda: answers(url), timeout=15, what="the server to answer")
        without = f"redis://{parts.hostname}:{parts.port}/0"
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(without, socket_connect_timeout=1).set("k", "v")
        redis.Redis.from_url(url).set("kept", "yes")
    finally:
        stop(proc)
    again, url_again = start_redis(tmp_path / "d")
    try:
        assert urlsplit(url_again).password == urlsplit(url).password  # the same password after a restart
        wait_for(lambda: answers(url_again), timeout=15, what="the server to answer again")
        assert redis.Redis.from_url(url_again).get("kept") == b"yes"
    finally:
        stop(again)


def test_no_password_turns_it_off(tmp_path: Path) -> None:
    proc, url = start_redis(tmp_path / "open", "--no-password")
    try:
        assert urlsplit(url).password is None and not (tmp_path / "open" / "redis.url").exists()
        wait_for(lambda: answers(url), timeout=15, what="the server to answer")
    finally:
        stop(proc)
