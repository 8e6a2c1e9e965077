"""A closed terminal's SIGHUP stops `serve` (and a worker) cleanly, exit 0, no store left running; a
SIGKILLed serve takes its store with it (Linux); serve's children never read its --config file again; a
--data-dir serve cannot use is one line and exit 2; --no-password leaves no stale URL file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import ROOT, children, cmdline, fast_settings, healthy, spawn, stop_process, wait_for
from tests.test_serve_store_supervision import alive, descendants, kill_all, start_serve, valkeys

pytestmark = pytest.mark.own_servers


def wait_serving(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    wait_for(lambda: healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None, timeout=60, interval=0.2,
             what="serve to answer")
    assert proc.poll() is None, log.read_text()[-3000:]


def end(proc: subprocess.Popen[bytes], started: list[int]) -> None:
    """No process of this test left behind, whatever failed."""
    if proc.poll() is None:
        started.extend(descendants(proc.pid))
        proc.kill()
        proc.wait()
    kill_all(started)


def test_sighup_stops_serve_cleanly_and_its_store_with_it(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    proc, port = start_serve(tmp_path / "data", log)
    started: list[int] = []
    try:
        wait_serving(proc, port, log)
        assert valkeys(proc.pid)
        started.extend(descendants(proc.pid))
        os.killpg(proc.pid, signal.SIGHUP)  # a hang-up reaches the terminal's foreground group: not the store
        code = proc.wait(40)
        assert code == 0, log.read_text()[-3000:]  # old: killed by SIGHUP (-1), its Valkey left with ppid 1
        wait_for(lambda: not [p for p in started if alive(p)], timeout=10, what="serve's processes to end")
    finally:
        end(proc, started)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_serve_takes_its_store_with_it(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    proc, port = start_serve(tmp_path / "data", log)
    started: list[int] = []
    try:
        wait_serving(proc, port, log)
        store = valkeys(proc.pid)
        started.extend(descendants(proc.pid))
        proc.kill()
        proc.wait()
        wait_for(lambda: not alive(store[0]), timeout=10, what="the store to go with serve")  # old: ran on
    finally:
        end(proc, started)


@pytest.mark.single_server
def test_sighup_stops_a_worker_gracefully(redis_url: str, r: redis.Redis) -> None:
    worker = spawn("worker", fast_settings(redis_url))
    try:
        wait_for(lambda: r.keys(keys.worker("default", "*")) or worker.poll() is not None, timeout=20,
                 what="the worker to register")
        assert worker.poll() is None
        assert stop_process(worker, signal.SIGHUP) == 0  # old: -1, killed with its runs
    finally:
        stop_process(worker, signal.SIGKILL)


@pytest.mark.single_server
def test_an_ignored_sighup_stays_ignored(redis_url: str, r: redis.Redis) -> None:
    """Under nohup (SIGHUP ignored, as exec passes it on) a worker is meant to outlive its terminal."""
    env = {**os.environ, **fast_settings(redis_url).to_env()}
    worker = subprocess.Popen([sys.executable, "-m", "sluicegate", "worker"], env=env, cwd=ROOT,
                              stdin=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        wait_for(lambda: r.keys(keys.worker("default", "*")) or worker.poll() is not None, timeout=20,
                 what="the worker to register")
        worker.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(1.0)
        assert stop_process(worker) == 0
    finally:
        stop_process(worker, signal.SIGKILL)


def test_children_do_not_read_the_config_file_again(tmp_path: Path) -> None:
    """A worker restarted after its --config file was deleted starts with serve's settings (old: it read
    the file again and exited 2, restarted for ever)."""
    config = tmp_path / "serve.toml"
    config.write_text("sim_tokens_per_second = 77.0\n")
    log = tmp_path / "serve.log"
    proc, port = start_serve(tmp_path / "data", log, "--config", str(config))
    started: list[int] = []
    try:
        wait_serving(proc, port, log)
        workers = [p for p in children(proc.pid) if " worker" in cmdline(p)]
        assert len(workers) == 1, [cmdline(p) for p in children(proc.pid)]
        config.unlink()
        os.kill(workers[0], signal.SIGKILL)
        new = wait_for(lambda: [p for p in children(proc.pid) if " worker" in cmdline(p) and p != workers[0]],
                       timeout=10, what="the worker's restart")[0]
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{new}/environ").read_text().split("\0") if item)
        assert "SLUICEGATE_CONFIG" not in environ
        assert environ["SLUICEGATE_SIM_TOKENS_PER_SECOND"] == "77.0"
        wait_for(lambda: "restarting it in" in log.read_text(), timeout=5, what="the first death's line")
        deaths = log.read_text().count("restarting it in")
        started.extend(descendants(proc.pid))
        stop_process(proc, signal.SIGTERM, timeout=40)
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert log.read_text().count("restarting it in") == deaths == 1, log.read_text()[-3000:]
    finally:
        end(proc, started)


def test_a_data_dir_serve_cannot_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    done = subprocess.run([sys.executable, "-m", "sluicegate", "serve", "--data-dir", str(afile), "--workers", "0"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=30, start_new_session=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"sluicegate serve: cannot use --data-dir {afile}: "), done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_no_password_leaves_no_stale_url_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "valkey").mkdir(parents=True, mode=0o700)
    (data / "valkey" / "redis.url").write_text("redis://:old-secret@127.0.0.1:1/0\n")
    log = tmp_path / "serve.log"
    proc, port = start_serve(data, log, "--no-password", "--workers", "0")
    started: list[int] = []
    try:
        wait_serving(proc, port, log)
        assert not (data / "valkey" / "redis.url").exists()  # old: left there, naming a stale password
        started.extend(descendants(proc.pid))
    finally:
        end(proc, started)
