"""`sluicegate redis`: a cluster node's death stops the others with exit 1 and SIGHUP stops the cluster
with exit 0, and the single server alike (it runs as a child: exec'd, Valkey ignored its closed terminal's
SIGHUP); the single server's URL line comes once it answers, and nothing holds its output after it; an
IPv6 --host is bracketed in the URL; a --cluster --host that is no IP address of this host is refused; a
--data-dir it cannot use is one line and exit 2; --no-password leaves no stale URL file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from sluicegate.embedded import free_port, free_port_block
from tests.helpers import ROOT, children, cmdline, wait_for
from tests.test_serve_store_supervision import alive, kill_all

pytestmark = pytest.mark.own_servers


def run_redis(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """`sluicegate redis FLAGS` in its own session, its stdout and stderr in files."""
    out, err = tmp_path / "redis.out", tmp_path / "redis.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "redis", *flags], stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL, cwd=ROOT, env=env, start_new_session=True)
    return proc, out, err


def printed_url(proc: subprocess.Popen[bytes], out: Path, err: Path) -> str:
    wait_for(lambda: out.read_text().strip() or proc.poll() is not None, timeout=30, what="the URL line")
    assert proc.poll() is None, err.read_text()
    return out.read_text().splitlines()[0]


def start_cluster(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, list[int]]:
    proc, out, err = run_redis(tmp_path, "--cluster", "3", "--port", str(free_port_block(3)),
                               "--data-dir", str(tmp_path / "data"))
    printed_url(proc, out, err)
    nodes = [pid for pid in children(proc.pid) if "valkey-server" in cmdline(pid)]
    assert len(nodes) == 3, [cmdline(pid) for pid in children(proc.pid)]
    return proc, err, nodes


def end(proc: subprocess.Popen[bytes], nodes: list[int]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    kill_all(nodes)


def test_a_dead_cluster_node_stops_the_others_with_exit_1(tmp_path: Path) -> None:
    proc, err, nodes = start_cluster(tmp_path)
    try:
        os.kill(nodes[1], signal.SIGKILL)
        assert proc.wait(20) == 1, err.read_text()  # old: one line, then ran on (and Ctrl-C gave 0)
        assert "exited with code -9; stopping" in err.read_text()
        assert not [pid for pid in nodes if alive(pid)]
    finally:
        end(proc, nodes)


def test_sighup_stops_the_cluster_with_exit_0(tmp_path: Path) -> None:
    proc, err, nodes = start_cluster(tmp_path)
    try:
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(20) == 0, err.read_text()  # old: killed by it (-1), the nodes left running
        wait_for(lambda: not [pid for pid in nodes if alive(pid)], timeout=10, what="the nodes to stop")
    finally:
        end(proc, nodes)


def test_an_ipv6_host_is_bracketed_in_the_url(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, out, err = run_redis(tmp_path, "--host", "::1", "--port", str(free_port("::1")), "--data-dir", str(data))
    try:
        url = printed_url(proc, out, err)
        assert "@[::1]:" in url, url
        assert (data / "redis.url").read_text().strip() == url
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        wait_for(lambda: answers(client), timeout=15, what="the server to answer at its URL")
        client.close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_single_servers_url_line_comes_once_it_answers(tmp_path: Path) -> None:
    """The line is what a script waits for before it starts `sluicegate api --redis-url "$url"` (as the
    cluster's comes once the cluster is up): it came before the exec, and the first PING was refused."""
    data = tmp_path / "data"
    proc, out, err = run_redis(tmp_path, "--port", str(free_port()), "--data-dir", str(data))
    try:
        url = printed_url(proc, out, err)
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        assert client.ping()  # at once, no retry: was "Connection refused"
        client.close()
        # the server runs as its child, which a supervisor's SIGTERM to the command stops (below); no exec:
        # Valkey ignores SIGHUP, and would outlive its closed terminal
        assert [pid for pid in children(proc.pid) if "valkey-server" in cmdline(pid)]
        assert out.read_text().splitlines() == [url]
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def start_single(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, list[int]]:
    proc, out, err = run_redis(tmp_path, "--port", str(free_port()), "--data-dir", str(tmp_path / "data"))
    printed_url(proc, out, err)
    servers = [pid for pid in children(proc.pid) if "valkey-server" in cmdline(pid)]
    return proc, err, servers or [proc.pid]  # old: the command was the server itself (an exec)


@pytest.mark.parametrize("to_group", [False, True], ids=["SIGHUP", "SIGHUP-to-its-group"])
def test_sighup_stops_the_single_server_with_exit_0(tmp_path: Path, to_group: bool) -> None:
    """A closed terminal: the single server stops, as the cluster does (old: Valkey ignores SIGHUP, so the
    exec'd server ran on, holding its port and data dir)."""
    proc, err, servers = start_single(tmp_path)
    try:
        if to_group:
            os.killpg(proc.pid, signal.SIGHUP)
        else:
            proc.send_signal(signal.SIGHUP)
        assert proc.wait(20) == 0, err.read_text()
        wait_for(lambda: not [pid for pid in servers if alive(pid)], timeout=10, what="the server to stop")
    finally:
        end(proc, servers)


def test_ctrl_c_stops_the_single_server_with_exit_0(tmp_path: Path) -> None:
    proc, err, servers = start_single(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: to its foreground group
        assert proc.wait(20) == 0, err.read_text()
        wait_for(lambda: not [pid for pid in servers if alive(pid)], timeout=10, what="the server to stop")
    finally:
        end(proc, servers)


def test_the_single_servers_death_stops_it_with_exit_1(tmp_path: Path) -> None:
    proc, err, servers = start_single(tmp_path)
    try:
        os.kill(servers[0], signal.SIGKILL)
        assert proc.wait(20) == 1, err.read_text()  # old: the command was the server, killed (-9)
        assert "exited with code -9; stopping" in err.read_text()
    finally:
        end(proc, servers)


def test_a_server_that_cannot_start_leaves_nothing_holding_its_output(tmp_path: Path) -> None:
    """Its port taken by a listener that never answers: Valkey exits 1, and the command's output ends with
    it. The process that waits to print the URL held stdout and stderr for ever (PING with no read timeout,
    and a dead server not yet reaped looked alive), so a caller reading the output to its end hung."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    try:
        result = subprocess.run([sys.executable, "-m", "sluicegate", "redis", "--port", str(taken.getsockname()[1]),
                                 "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, cwd=ROOT,
                                env=env, stdin=subprocess.DEVNULL, timeout=30)
    finally:
        taken.close()
    assert result.returncode == 1 and "Address already in use" in result.stderr, result.stderr
    assert result.stdout == ""  # no URL for a server that never answered


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_cluster_host_must_be_an_ip_address_of_this_host(tmp_path: Path) -> None:
    proc, _, err = run_redis(tmp_path, "--cluster", "3", "--host", "localhost", "--port", str(free_port_block(3)),
                             "--data-dir", str(tmp_path / "data"))
    try:
        assert proc.wait(30) == 2, err.read_text()  # old: the nodes started, then a traceback from CLUSTER MEET
        assert err.read_text().startswith("sluicegate redis: --cluster needs --host to be one IP address"), \
            err.read_text()
        assert err.read_text().count("\n") == 1
    finally:
        end(proc, [])
    from sluicegate.embedded import announceable  # here: the other tests run on code without it

    assert announceable("127.0.0.1") and announceable("::1")
    assert not announceable("0.0.0.0") and not announceable("::") and not announceable("localhost")


@pytest.mark.parametrize("flags", [(), ("--cluster", "3")], ids=["server", "cluster"])
def test_a_data_dir_it_cannot_use_is_one_line_and_exit_2(tmp_path: Path, flags: tuple[str, ...]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    proc, _, err = run_redis(tmp_path, *flags, "--port", str(free_port_block(3)), "--data-dir", str(afile))
    try:
        assert proc.wait(30) == 2, err.read_text()  # old: a traceback, exit 1
        assert err.read_text().startswith(f"sluicegate redis: cannot use --data-dir {afile}: "), err.read_text()
        assert err.read_text().count("\n") == 1
    finally:
        end(proc, [])


def test_no_password_leaves_no_stale_url_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "redis.url").write_text("redis://:old-secret@127.0.0.1:1/0\n")
    proc, out, err = run_redis(tmp_path, "--no-password", "--port", str(free_port()), "--data-dir", str(data))
    try:
        url = printed_url(proc, out, err)
        assert "@" not in url, url
        assert not (data / "redis.url").exists()  # old: left there, naming a stale password
    finally:
        proc.terminate()
        proc.wait(20)
