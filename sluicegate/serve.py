"""`sluicegate serve`: the embedded server, the API, a scheduler and N workers in one process tree.

The embedded server runs in its own process group so that a terminal's Ctrl-C (which reaches the
whole foreground group) stops the API, scheduler and workers first, and the server last, after the
workers have handed their runs back. A worker that dies is restarted; the API or the scheduler
dying stops everything with an error.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sluicegate.embedded import EmbeddedServer, ServerNotFound
from sluicegate.settings import Settings

log = logging.getLogger("sluicegate.serve")


def spawn(role: str, settings: Settings, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.Popen([sys.executable, "-m", "sluicegate", role, *extra], env=env, stdin=subprocess.DEVNULL)


def serve(settings: Settings) -> int:
    server: EmbeddedServer | None = None
    if not settings.redis_url:
        try:
            server = EmbeddedServer(data_dir=str(Path(settings.data_dir) / "valkey"), appendfsync=settings.appendfsync)
            server.start(new_session=True)
        except (ServerNotFound, RuntimeError, TimeoutError) as error:
            print(f"sluicegate serve: {error}", file=sys.stderr)
            return 1
        settings = settings.replace(redis_url=server.url)
        log.info("embedded Valkey on %s (AOF, appendfsync %s) in %s", server.url, settings.appendfsync,
                 server.data_dir)

    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    core = {"scheduler": spawn("scheduler", settings), "api": spawn("api", settings)}
    workers = [spawn("worker", settings) for _ in range(settings.workers)]
    log.info("serving on http://%s:%d with %d workers (%s engine)", settings.host, settings.port,
             settings.workers, settings.engine)
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            for role, proc in core.items():
                if proc.poll() is not None:
                    log.error("%s exited with code %s; stopping", role, proc.returncode)
                    stopping, code = True, 1
            for i, proc in enumerate(workers):
                if proc.poll() is not None and not stopping:
                    log.warning("worker %d exited with code %s; restarting it", proc.pid, proc.returncode)
                    workers[i] = spawn("worker", settings)
    finally:
        children = [core["api"], *workers, core["scheduler"]]
        for proc in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace_seconds + 5
        for proc in children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if server is not None:
            server.stop()
        log.info("stopped")
    return code
