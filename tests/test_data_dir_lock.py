"""One store per data dir: while `serve` (its embedded server or cluster) or `sluicegate redis` runs on a
--data-dir, a second one there exits 2 with one line naming the dir, before it touches the first one's Unix
socket, redis.url or AOF (it used to take over the socket and share the AOF); the lock goes with the
processes that hold the store, so a SIGKILLed serve leaves the dir free. And a data dir holding a cluster of
another size names the flag of the command that was run (`--embedded-cluster 3` for serve)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sluicegate.embedded import free_port, free_port_block
from tests.helpers import ROOT, healthy, stop_process, wait_for
from tests.test_cli_redis import printed_url, run_redis
from tests.test_serve_signals import end, wait_serving
from tests.test_serve_store_supervision import alive, descendants, kill_all, start_serve, valkeys, wait_ended

pytestmark = pytest.mark.own_servers

IN_USE = "is in use by another `sluicegate serve` or `sluicegate redis`"


def refused(proc: subprocess.Popen[bytes], stderr: Path, data: Path, command: str) -> None:
    """`proc` exits 2 with the one line that names `data` as in use."""
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:  # old: it started a second store on the dir, and ran on
        raise AssertionError(f"a second store ran on {data}: {stderr.read_text()[-2000:]}") from None
    assert code == 2, stderr.read_text()[-3000:]
    assert stderr.read_text() == f"sluicegate {command}: --data-dir {data} {IN_USE}\n"


def inode(path: Path) -> int:
    return path.stat().st_ino


@pytest.mark.parametrize("flags", [(), ("--embedded-cluster", "3")], ids=["server", "cluster"])
def test_a_second_store_on_serves_data_dir_is_refused(tmp_path: Path, flags: tuple[str, ...]) -> None:
    data = tmp_path / "data"
    store = data / ("valkey-cluster" if flags else "valkey")
    log = tmp_path / "serve.log"
    proc, port = start_serve(data, log, *flags)
    started: list[int] = []
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_serving(proc, port, log)
        started.extend(descendants(proc.pid))
        stores, url = valkeys(proc.pid), (store / "redis.url").read_text()
        socket = None if flags else inode(store / "valkey.sock")
        again = tmp_path / "again.log"
        second, _ = start_serve(data, again, *flags)
        refused(second, again, data, "serve")
        if not flags:  # `sluicegate redis` on serve's store dir: the same lock
            redis_proc, _, err = run_redis(tmp_path, "--port", str(free_port()), "--data-dir", str(store))
            refused(redis_proc, err, store, "redis")
        # The first stack is untouched: its store, its socket, its URL file, its API
        assert valkeys(proc.pid) == stores and all(alive(pid) for pid in stores)
        assert (store / "redis.url").read_text() == url
        if socket is not None:
            assert inode(store / "valkey.sock") == socket  # old: the second Valkey unlinked it and bound its own
        assert healthy(f"http://127.0.0.1:{port}")
        assert stop_process(proc, signal.SIGTERM, timeout=40) == 0, log.read_text()[-3000:]
    finally:
        if second is not None:
            end(second, descendants(second.pid))
        end(proc, started)


def test_a_second_redis_on_its_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, out, err = run_redis(tmp_path, "--port", str(free_port()), "--data-dir", str(data))
    others: list[subprocess.Popen[bytes]] = []
    try:
        printed_url(proc, out, err)
        url, socket = (data / "redis.url").read_text(), inode(data / "valkey.sock")
        for flags in (("--port", str(free_port())), ("--cluster", "3", "--port", str(free_port_block(3)))):
            scratch = tmp_path / f"second-{len(others)}"
            scratch.mkdir()
            other, _, other_err = run_redis(scratch, *flags, "--data-dir", str(data))
            others.append(other)
            refused(other, other_err, data, "redis")
        assert (data / "redis.url").read_text() == url
        assert inode(data / "valkey.sock") == socket
        assert proc.poll() is None
    finally:
        for other in others:
            end(other, descendants(other.pid))
        proc.terminate()
        proc.wait(20)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_serve_leaves_its_data_dir_free(tmp_path: Path) -> None:
    """The lock goes with the processes that hold the store: none outlives a SIGKILLed serve (die_with_parent)."""
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    proc, port = start_serve(data, log)
    started: list[int] = []
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_serving(proc, port, log)
        started.extend(descendants(proc.pid))
        proc.kill()
        proc.wait()
        wait_ended(started, 60, "serve's children to end")
        again = tmp_path / "again.log"
        second, second_port = start_serve(data, again)
        wait_serving(second, second_port, again)
        started.extend(descendants(second.pid))
        assert stop_process(second, signal.SIGTERM, timeout=40) == 0, again.read_text()[-3000:]
    finally:
        if second is not None:
            end(second, started)
        end(proc, started)


def test_a_sigkilled_redis_leaves_its_data_dir_free(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, out, err = run_redis(tmp_path, "--port", str(free_port()), "--data-dir", str(data))
    started: list[int] = []
    try:
        printed_url(proc, out, err)
        started.extend(descendants(proc.pid))
        proc.kill()
        proc.wait()
        wait_for(lambda: not [pid for pid in started if alive(pid)], timeout=20, what="its server to end")
        scratch = tmp_path / "second"
        scratch.mkdir()
        second, second_out, second_err = run_redis(scratch, "--port", str(free_port()), "--data-dir", str(data))
        try:
            printed_url(second, second_out, second_err)
        finally:
            second.terminate()
            assert second.wait(20) == 0, second_err.read_text()
    finally:
        kill_all(started)


def fake_cluster(directory: Path, masters: int) -> int:
    """A data dir as one a cluster of `masters` nodes left (start() reads only which node-PORT/nodes.conf exist)."""
    base = free_port_block(masters)
    for index in range(masters):
        node = directory / f"node-{base + index}"
        node.mkdir(parents=True, mode=0o700)
        (node / "nodes.conf").write_text("")
    return base


def test_a_cluster_of_another_size_names_the_flag_that_was_passed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fake_cluster(data / "valkey-cluster", 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    done = subprocess.run([sys.executable, "-m", "sluicegate", "serve", "--embedded-cluster", "4", "--data-dir",
                           str(data), "--port", str(free_port()), "--workers", "0"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60, start_new_session=True)
    assert done.returncode == 2, done.stderr  # a refusal before anything starts, as a bad setting (it was 1)
    # old: "pass the same --cluster N (and --port) as before": serve has no --cluster, and its --port is the API's
    assert "pass --embedded-cluster 3 as before, or use a new data dir" in done.stderr, done.stderr
    assert "--cluster" not in done.stderr and "--port" not in done.stderr, done.stderr
    redis_data = tmp_path / "redis-data"
    fake_cluster(redis_data, 3)
    done = subprocess.run([sys.executable, "-m", "sluicegate", "redis", "--cluster", "4", "--data-dir",
                           str(redis_data)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
                          start_new_session=True)
    assert done.returncode == 2, done.stderr
    assert "pass --cluster 3 as before, or use a new data dir" in done.stderr, done.stderr
