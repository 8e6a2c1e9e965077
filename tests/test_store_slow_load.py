"""A store that takes long to load its AOF is waited for, not killed mid-load: a large store must be able to come
back (`sluicegate redis` ran Valkey as an exec before, with no bound on its load; the start's 15 s bound
then killed such a store on every restart). A stop asked while it loads is honoured at once, gracefully.
Valkey's `key-load-delay` (microseconds a key while loading) stands in for a large AOF (the server then takes
connections and answers none until it has loaded)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from sluicegate.embedded import EmbeddedServer, free_port
from tests.helpers import ROOT

pytestmark = pytest.mark.own_servers

KEYS = 2000


class SlowLoadingServer(EmbeddedServer):
    """The embedded server, loading each key `delay_us` slower."""

    delay_us = 4000  # 2,000 keys x 4 ms: about 8 s of loading

    def command(self) -> list[str]:
        return [*super().command(), "--key-load-delay", str(self.delay_us)]


def a_store_of_many_keys(data_dir: Path) -> None:
    server = EmbeddedServer(data_dir=str(data_dir), port=free_port(), password=None).start()
    client = redis.Redis(host=server.host, port=server.port)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(KEYS):
            pipe.set(f"k{i}", "v")
        pipe.execute()
        client.bgrewriteaof()  # the keys in the AOF's base file, which the load reads key by key
        deadline = time.monotonic() + 30
        while client.info("persistence")["aof_rewrite_in_progress"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.close()
        server.stop()


def test_a_store_loading_past_the_start_timeout_is_waited_for(tmp_path: Path) -> None:
    a_store_of_many_keys(tmp_path)
    server = SlowLoadingServer(data_dir=str(tmp_path), port=free_port(), password=None)
    began = time.monotonic()
    try:
        server.start(timeout=1.0)  # the load takes about 8 s: alive and loading, it is waited for
        loaded = time.monotonic() - began
        assert redis.Redis(host=server.host, port=server.port).dbsize() == KEYS
    finally:
        server.stop()
    assert loaded > 5.0, f"loaded in {loaded:.1f} s: the load was not slow enough to test the wait"


def test_a_stop_while_the_single_server_loads_is_honoured_at_once(tmp_path: Path) -> None:
    a_store_of_many_keys(tmp_path)
    code = f"""
import sys
from sluicegate import embedded
command = embedded.EmbeddedServer.command
embedded.EmbeddedServer.command = lambda self: [*command(self), '--key-load-delay', '15000']  # 30 s of loading
from sluicegate.cli import main
sys.exit(main(['redis', '--port', '{free_port()}', '--data-dir', '{tmp_path}', '--no-password']))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=env, start_new_session=True)
    try:
        time.sleep(2)  # loading by now
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=10)  # before: ignored until the start's 15 s ran out, then exit 1
        assert proc.returncode == 0, err.decode()[-2000:]
        assert out == b""  # it never answered: no URL line
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
