"""`sluicegate serve`: the embedded server, the API, a scheduler and N workers in one process tree.

The embedded store is one Valkey server, or with `--embedded-cluster N` a Valkey Cluster of N
masters; either way the children get its URL (and `--redis-cluster` for a cluster). The store runs
in its own process group so that a terminal's Ctrl-C (which reaches the whole foreground group)
stops the API, scheduler and workers first, and the store last, after the workers have handed their
runs back. A worker that dies is restarted; the API or the scheduler dying stops everything with an
error.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sluicegate.embedded import EmbeddedCluster, EmbeddedServer, ServerNotFound
from sluicegate.settings import Settings

log = logging.getLogger("sluicegate.serve")


def spawn(role: str, settings: Settings, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.Popen([sys.executable, "-m", "sluicegate", role, *extra], env=env, stdin=subprocess.DEVNULL)


def embedded_store(settings: Settings) -> EmbeddedServer | EmbeddedCluster:
    if settings.embedded_cluster:
        return EmbeddedCluster(data_dir=str(Path(settings.data_dir) / "valkey-cluster"),
                               masters=settings.embedded_cluster, appendfsync=settings.appendfsync)
    return EmbeddedServer(data_dir=str(Path(settings.data_dir) / "valkey"), appendfsync=settings.appendfsync)


def serve(settings: Settings) -> int:
    store: EmbeddedServer | EmbeddedCluster | None = None
    if not settings.redis_url:
        store = embedded_store(settings)
        try:
            store.start(new_session=True)
        except (ServerNotFound, RuntimeError, TimeoutError, ValueError) as error:
            print(f"sluicegate serve: {error}", file=sys.stderr)
            return 1
        # The children use the store we started: they start none themselves.
        settings = settings.replace(redis_url=store.url, redis_cluster=store.cluster, embedded_cluster=0)
        log.info("embedded Valkey %s on %s (AOF, appendfsync %s) in %s",
                 f"cluster of {store.masters} masters" if isinstance(store, EmbeddedCluster) else "server",
                 store.url, settings.appendfsync, store.data_dir)
    if settings.redis_cluster and not settings.rq_redis_url:
        log.info("Redis Cluster without --rq-redis-url: the workers' rq presence is off (rq has no cluster "
                 "support, rq#1942)")

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
            time.sleep(0.2)  # resumed after a signal handler ran (PEP 475): look at `stopping` first
            if stopping:  # Ctrl-C reaches the children too: one that exits now is no failure
                break
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
        if store is not None:
            store.stop()
        log.info("stopped")
    return code
