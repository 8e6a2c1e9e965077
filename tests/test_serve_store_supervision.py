"""`serve` supervises its embedded store: a kill -9 of its Valkey (or of a cluster node) stops the whole
stack with exit code 1, no child left; and a SIGINT or SIGTERM while the store starts leaves no Valkey
behind (the store runs in its own session, so nothing else would ever stop it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from sluicegate.embedded import find_server_binary, free_port
from sluicegate.serve import FIRST_RESTART_DELAY, MAX_RESTART_DELAY, STABLE_SECONDS, Restarted
from sluicegate.settings import from_env
from tests.helpers import ROOT, children, cmdline, healthy, wait_for

pytestmark = pytest.mark.own_servers

# serve with SIGINT at its default disposition, as a terminal's foreground job has it (a test runner in the
# background may have it ignored)
SERVE = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
         "os.execv(sys.executable, [sys.executable, '-m', 'sluicegate', 'serve', *sys.argv[1:]])")


def start_serve(data_dir: Path, log: Path, *flags: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "--data-dir", str(data_dir), "--port", str(port),
                             "--workers", "1", "--sim-prefill-ms", "0", "--log-level", "info", *flags],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=ROOT, env=env,  # noqa: SIM115
                            start_new_session=True)
    return proc, port


def descendants(pid: int) -> list[int]:
    found = children(pid)
    for child in list(found):
        found.extend(descendants(child))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, or a pid reused by another program, is not our process alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def valkeys(serve_pid: int) -> list[int]:
    return [pid for pid in children(serve_pid) if "valkey-server" in cmdline(pid)]


def process_state(pid: int) -> str:
    """What a test that waits for `pid` to end says of it when it does not: its command, state, kernel wait
    channel and signal masks (a child that ignores or blocks the signal meant to end it shows here)."""
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = (proc / "wchan").read_text()
        masks = [line for line in (proc / "status").read_text().splitlines() if line.startswith(("Sig", "ShdPnd"))]
    except (OSError, IndexError):
        return f"{pid}: gone"
    return f"{pid} {cmdline(pid)[:120]!r}: state {state}, wchan {wchan}, {' '.join(masks)}"


def wait_ended(pids: list[int], timeout: float, what: str) -> None:
    """Until none of `pids` runs; past `timeout` an AssertionError naming each that still does, and how."""
    deadline = time.monotonic() + timeout
    while running := [pid for pid in pids if alive(pid)]:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: still running "
                                 + "; ".join(process_state(pid) for pid in running))
        time.sleep(0.2)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("flags", [(), ("--embedded-cluster", "3")], ids=["server", "cluster"])
def test_serve_stops_with_code_1_when_its_store_dies(tmp_path: Path, flags: tuple[str, ...]) -> None:
    log = tmp_path / "serve.log"
    proc, port = start_serve(tmp_path / "data", log, *flags)
    started: list[int] = []
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None, timeout=60, interval=0.2,
                 what="serve to answer")
        assert proc.poll() is None, log.read_text()[-3000:]
        stores = valkeys(proc.pid)
        assert len(stores) == (3 if flags else 1), [cmdline(p) for p in children(proc.pid)]
        started.extend(descendants(proc.pid))
        os.kill(stores[-1], signal.SIGKILL)
        try:
            code = proc.wait(40)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve outlived its store: {log.read_text()[-3000:]}") from None
        text = log.read_text()
        assert code == 1, text[-3000:]
        assert f"(pid {stores[-1]}) exited with code -9; stopping" in text, text[-3000:]
        assert not [p for p in started if alive(p)], [cmdline(p) for p in started if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(started)


def populate_aof(directory: Path, keys: int) -> None:
    """An AOF of `keys` keys in `directory`, for a server that takes a moment to load it."""
    directory.mkdir(parents=True, mode=0o700)
    port = free_port()
    server = subprocess.Popen([find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir",
                               str(directory), "--appendonly", "yes", "--save", "", "--enable-debug-command", "yes",
                               "--logfile", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        wait_for(lambda: _answers(client), timeout=15, what="the populating server")
        client.execute_command("DEBUG", "POPULATE", keys, "k", 8)
        client.bgrewriteaof()
        wait_for(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0
                 and client.info("persistence")["aof_rewrite_scheduled"] == 0, timeout=30, interval=0.1,
                 what="the AOF rewrite")
        client.close()
    finally:
        server.terminate()
        server.wait(20)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_store_starts_leaves_no_valkey_behind(tmp_path: Path, sig: signal.Signals) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    populate_aof(data / "valkey", 300_000)  # loads in a moment: the test catches the server before it answers
    log = tmp_path / "serve.log"
    proc, _ = start_serve(data, log)
    store: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not store and time.monotonic() < deadline and proc.poll() is None:
            store = valkeys(proc.pid)
        assert store, log.read_text()[-3000:]
        # Held where serve waits for it to answer (SIGKILL still ends a stopped process)
        os.kill(store[0], signal.SIGSTOP)
        time.sleep(0.5)
        assert "embedded Valkey server on" not in log.read_text(), "the store answered before the test held it"
        proc.send_signal(sig)
        proc.wait(20)
        wait_for(lambda: not alive(store[0]), timeout=5, what="the store to go")  # old serve: orphaned, ppid 1
        assert proc.returncode == 1, log.read_text()[-3000:]
        assert "stopped while its store was starting" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(store)


def test_a_child_that_keeps_dying_quickly_is_restarted_after_a_doubling_delay() -> None:
    """Driven with its own clock: each quick death doubles the delay up to 5 s; one after a stable run
    starts over at 0.2 s (the old loop respawned a worker whose store was gone every 0.2 s)."""
    child = Restarted("no-such-role", from_env(environ={}))  # `sluicegate no-such-role` exits at once
    delays = []
    now = child.started
    for _ in range(7):
        child.proc.wait(20)
        child.check(now)  # notices the death
        assert child.restart_at is not None
        delays.append(child.delay)
        dead = child.proc
        child.check(child.restart_at - 0.01)
        assert child.proc is dead  # not before its delay is over
        now = child.restart_at
        child.check(now)  # respawns it
        assert child.proc is not dead and child.restart_at is None
    assert delays == [FIRST_RESTART_DELAY, 0.4, 0.8, 1.6, 3.2, MAX_RESTART_DELAY, MAX_RESTART_DELAY]
    child.proc.wait(20)
    child.check(now + STABLE_SECONDS)
    assert child.delay == FIRST_RESTART_DELAY
