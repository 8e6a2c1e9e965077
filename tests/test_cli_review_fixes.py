"""The operator's first contact (review cli2): an empty flag unsets a setting in every child too; a backend URL no
client can connect to is a bad setting; ./dev keeps the caller's directory for serve's and bench's paths; serve
refuses a port something already listens on before it starts anything; a shared engine's slots are all given
out; the reference lists every command; a config's top-level `group` beside [groups.NAME] tables is refused."""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluicegate.cli import COMMANDS, main
from sluicegate.embedded import free_port
from sluicegate.groups_config import load_groups
from sluicegate.settings import BadSetting, Settings, from_env
from tests.helpers import ON_CLUSTER, ROOT, children, cmdline, healthy, stop_process, wait_for

NOWHERE = "redis://127.0.0.1:1/0"  # refused at once: a command that got past its settings exits 1 there
CLUSTER = ["--redis-cluster"] if ON_CLUSTER else []


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}, **extra}


def start(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """`sluicegate ARGS` in the background, its stderr (the log) in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "sluicegate", *args], cwd=ROOT, env=clean_env(**env),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
                                start_new_session=True)


def wait_serving(proc: subprocess.Popen[bytes], log: Path) -> None:
    """serve's "serving on" line is in its log, and serve still runs."""
    wait_for(lambda: "serving on" in log.read_text() or proc.poll() is not None, timeout=30, interval=0.1,
             what="serving on")
    assert proc.poll() is None, log.read_text()[-3000:]


def status(url: str, key: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


# 1. An empty flag unsets a setting in serve's children and in the API's processes, over an inherited variable


def test_an_unset_setting_overrides_the_inherited_variable_in_a_childs_environment() -> None:
    settings = from_env(environ={"SLUICEGATE_ADMIN_KEY": "envkey", "SLUICEGATE_SLOTS": "3"}, admin_key="", slots="")
    assert settings.admin_key is None and settings.slots is None  # flags beat the environment
    env = settings.child_env({"SLUICEGATE_ADMIN_KEY": "envkey", "SLUICEGATE_SLOTS": "3", "PATH": "/bin"})
    child = from_env(environ=env)
    assert (child.admin_key, child.slots) == (None, None), env  # old: envkey and 3 again, in every child
    assert child == settings.replace(config=None)


@pytest.mark.parametrize("command", ["api", "serve"])
def test_an_empty_admin_key_flag_beats_the_variable_in_the_running_api(tmp_path: Path, redis_url: str,
                                                                       command: str) -> None:
    port = free_port()
    extra = ["--workers", "0"] if command == "serve" else []
    proc = start([command, "--redis-url", redis_url, *CLUSTER, "--port", str(port), "--auth", "--admin-key", "",
                  "--metrics-key", "", "--log-level", "warning", *extra], tmp_path / "log",
                 SLUICEGATE_ADMIN_KEY="envkey", SLUICEGATE_METRICS_KEY="mk")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(base) or proc.poll() is not None, timeout=20, interval=0.1, what="the API")
        assert proc.poll() is None, (tmp_path / "log").read_text()
        assert status(f"{base}/v1/admin/audit", "envkey") in (401, 403)  # old: 200, the key unset is live
        assert status(f"{base}/metrics", "mk") in (401, 403)  # old: 200
    finally:
        stop_process(proc, signal.SIGINT)


# 2. A backend URL with a bad port or no host: one line and exit 2, before anything starts


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/v1", "http://127.0.0.1:80000/v1", "http://",
                                 "http://127.0.0.1:0/v1", "http://[::1/v1"])
def test_a_backend_url_no_client_can_connect_to_is_a_bad_setting(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    for name in [n for n in os.environ if n.startswith("SLUICEGATE_")]:
        monkeypatch.delenv(name)
    code = main(["worker", "--redis-url", NOWHERE, "--engine", "openai", "--backend-url", url])
    err = capsys.readouterr().err
    assert code == 2, err  # old: past the settings (exit 1 at the store here; a traceback at the engine after)
    assert err.startswith(f"sluicegate: bad setting: backend_url: `{url}`") and err.count("\n") == 1, err
    assert err.rstrip().endswith("(from --backend-url)"), err
    with pytest.raises(BadSetting, match="^otel_endpoint: "):  # the same check for the other http(s) URL
        from_env(environ={}, otel_endpoint=url)


def test_a_groups_backend_url_with_a_bad_port_is_a_bad_setting(tmp_path: Path) -> None:
    config = tmp_path / "g.toml"
    config.write_text('[groups.a]\nengine = "openai"\nbackend_url = "http://127.0.0.1:80000/v1"\nworkers = 1\n')
    with pytest.raises(BadSetting, match=r"^groups\.a\.backend_url: `http://127\.0\.0\.1:80000/v1`: its port should "
                                         r"be a number 1-65535, in "):
        load_groups(from_env(environ={}, config=str(config)))  # old: accepted; each worker then died at start


def test_serve_with_a_backend_url_of_a_bad_port_starts_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = subprocess.run([sys.executable, "-m", "sluicegate", "serve", "--engine", "openai", "--backend-url",
                           "http://127.0.0.1:99999/v1", "--data-dir", str(data), "--port", str(free_port())],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=30,
                          start_new_session=True)
    assert done.returncode == 2, done.stderr  # old: the store started, then a traceback, exit 1
    assert done.stderr.splitlines() == ["sluicegate: bad setting: backend_url: `http://127.0.0.1:99999/v1`: its "
                                        "port should be a number 1-65535 (from --backend-url)"]
    assert not data.exists()


# 3. ./dev: serve's and bench's relative paths are the caller's; test and lint run in the repository


@pytest.fixture
def fake_checkout(tmp_path: Path) -> Path:
    """A copy of ./dev in a checkout whose .venv is installed (its stamp) and whose commands print where they
    run: the path logic of ./dev, without a venv of its own (./dev would create one)."""
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(Path(ROOT) / "dev", repo / "dev")
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    stamp = hashlib.sha1((repo / "pyproject.toml").read_bytes()).hexdigest()[:12]
    (repo / ".venv" / f".installed-{stamp}").touch()
    for tool in ("sluicegate", "ruff"):
        script = repo / ".venv" / "bin" / tool
        script.write_text(f'#!/bin/sh\necho "{tool} in $PWD: $*"\n')
        script.chmod(0o755)
    return repo


def test_dev_runs_serve_and_bench_in_the_callers_directory(fake_checkout: Path, tmp_path: Path) -> None:
    mine = tmp_path / "a" / "mine"
    mine.mkdir(parents=True)

    def dev(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "../../repo/dev", *args], cwd=mine, capture_output=True, text=True,
                              timeout=20)

    serve = dev("serve", "--config", "my.toml", "--data-dir", "./data")
    assert serve.returncode == 0, serve.stderr
    assert serve.stdout == f"sluicegate in {mine}: serve --config my.toml --data-dir ./data\n"  # old: in the repo
    bench = dev("bench", "throughput", "--out", "x.json")
    assert bench.stdout == f"sluicegate in {mine}: bench throughput --out x.json\n", bench.stderr
    lint = dev("lint")  # the repository's code, wherever it is called from
    assert lint.stdout == f"ruff in {fake_checkout}: check .\n", lint.stderr
    usage = dev("help")
    assert usage.returncode == 2 and "./dev serve [flags]" in usage.stdout, usage.stderr  # old: sed found no file


# 4. serve and a port something already listens on: one line, exit 2, before anything starts


@pytest.fixture
def foreign_http() -> Iterator[int]:
    """Another HTTP server on a port, answering 200 to everything (`/healthz` included)."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def refused_port(done: subprocess.CompletedProcess[str], port: int) -> None:
    assert done.returncode == 2, done.stderr  # old: 1, after "serving on" and its API's failure to bind
    assert "serving on" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == [f"sluicegate serve: port {port} is in use on 127.0.0.1: stop what listens "
                                        "there (another serve or `sluicegate api`?), or give another --port"]


def test_serve_on_a_port_another_server_answers_on_is_refused(tmp_path: Path, foreign_http: int) -> None:
    done = subprocess.run([sys.executable, "-m", "sluicegate", "serve", "--port", str(foreign_http), "--workers", "1",
                           "--data-dir", str(tmp_path / "data")], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=30, start_new_session=True)
    refused_port(done, foreign_http)
    assert not list((tmp_path / "data").rglob("*.aof*")) and not list((tmp_path / "data").rglob("*.log"))


def test_serve_on_a_port_held_with_so_reuseport_is_refused(redis_url: str) -> None:
    """A holder that set SO_REUSEPORT (and is no HTTP server): the check itself sets no SO_REUSEPORT, which
    would let it share the port."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "sluicegate", "serve", "--redis-url", redis_url, *CLUSTER,
                               "--port", str(port), "--workers", "0"], cwd=ROOT, env=clean_env(), capture_output=True,
                              text=True, timeout=30, start_new_session=True)
    refused_port(done, port)


def test_serve_starts_again_on_the_port_its_last_run_left(tmp_path: Path, redis_url: str) -> None:
    """The check holds no port: the API (2 processes here) binds it next, run after run."""
    port = free_port()
    for run in range(2):
        log = tmp_path / f"serve{run}.log"
        proc = start(["serve", "--redis-url", redis_url, *CLUSTER, "--port", str(port), "--workers", "0",
                      "--api-processes", "2"], log)
        try:
            wait_serving(proc, log)
            assert healthy(f"http://127.0.0.1:{port}")
            assert stop_process(proc, signal.SIGINT) == 0, log.read_text()[-3000:]
        finally:
            stop_process(proc, signal.SIGKILL)


def test_a_port_left_in_time_wait_is_not_in_use() -> None:
    """A connection the last run closed first stays in TIME_WAIT on the port; uvicorn binds past it
    (SO_REUSEADDR), so serve's check must too."""
    from sluicegate.serve import port_in_use

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's (and asyncio's) server
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: its end goes to TIME_WAIT
        client.recv(1)
        client.close()
        assert port_in_use(Settings(port=port))  # still listening
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the TIME_WAIT is there: a bind without SO_REUSEADDR fails
    assert not port_in_use(Settings(port=port))


def test_a_host_name_no_lookup_can_encode_is_left_to_the_api() -> None:
    """`--host a..b`: the lookup raises UnicodeError (IDNA), not OSError; the check leaves it to the API to
    report, as any other lookup failure, instead of a traceback from serve."""
    from sluicegate.serve import port_in_use

    assert not port_in_use(Settings(host="a..b", port=18999))


# 5. serve's sharing of one engine: every slot given out, the first workers one more


@pytest.fixture
def engine_of_four_slots() -> Iterator[str]:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    from sluicegate.workers.sim_backend import create_sim_backend
    from tests.openai_helpers import ServerThread

    async def props(_: Any) -> JSONResponse:
        return JSONResponse({"total_slots": 4})

    with ServerThread(Starlette(routes=[Route("/props", props), Mount("/", create_sim_backend(2000.0, 0.0))])) as app:
        yield app.url


def test_serve_gives_out_every_slot_of_a_shared_engine(engine_of_four_slots: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from sluicegate.serve import share_engine

    pool = Settings(engine="openai", backend_url=engine_of_four_slots, backend_model="sim", workers=3)
    with caplog.at_level(logging.INFO, logger="sluicegate.serve"):
        shares = share_engine(pool)
    # old: "3 workers x 1 slots", and each worker 1: one of the engine's 4 slots never used
    assert "group default: its engine runs 4 requests at once: workers 1 x 2 + 2 x 1 slots" in caplog.messages
    assert [(worker.slots, worker.group) for worker in shares] == [(2, "default"), (1, "default"), (1, "default")]


def test_serves_workers_get_their_shares(tmp_path: Path, redis_url: str, engine_of_four_slots: str) -> None:
    log = tmp_path / "serve.log"
    proc = start(["serve", "--redis-url", redis_url, *CLUSTER, "--port", str(free_port()), "--workers", "3",
                  "--engine", "openai", "--backend-url", engine_of_four_slots, "--backend-model", "sim"], log)
    try:
        wait_serving(proc, log)

        def slots() -> list[str]:
            found = []
            for pid in children(proc.pid):
                if " worker" in cmdline(pid):
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    found += [item.split(b"=", 1)[1].decode() for item in environ
                              if item.startswith(b"SLUICEGATE_SLOTS=")]
            return sorted(found)

        assert wait_for(lambda: len(s := slots()) == 3 and s, timeout=10, what="3 workers") == ["1", "1", "2"]
    finally:
        stop_process(proc, signal.SIGINT)


# 6. The reference's table of the pieces names every command that runs one


def test_the_reference_lists_every_command_that_runs_a_piece() -> None:
    text = (Path(ROOT) / "docs" / "reference.md").read_text()
    table = text.split("## Running the pieces separately", 1)[1].lstrip().split("\n\n", 1)[0]
    rows = set(re.findall(r"^\| `sluicegate ([a-z-]+)", table, flags=re.MULTILINE))
    assert set(COMMANDS) <= rows, set(COMMANDS) - rows  # old: no `sluicegate webhooks`


# The note: a top-level `group` in a file with [groups.NAME] tables is refused, as --group is


def test_a_top_level_group_beside_group_tables_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "g.toml"
    config.write_text('group = "zzz"\n[groups.a]\nworkers = 1\n')
    with pytest.raises(BadSetting, match=r"^group: a top-level `group` names the one group of a config without "
                                         r"\[groups\.NAME\] tables; .* has \[groups\.a\]$"):
        load_groups(from_env(environ={}, config=str(config)))  # old: accepted, and group zzz never served
    config.write_text('group = "zzz"\n')  # without tables it is the group served, as before
    assert load_groups(from_env(environ={}, config=str(config))) == []

