"""rq presence: a `sluicegate worker` process is an rq worker of queue `sluicegate.<group>` in rq's
registry (what `rq info` and rq-dashboard show operators), kept there by its heartbeats, and gone
after a graceful shutdown. Requests themselves never become rq jobs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import redis
from rq import Worker as RqWorker

from sluicegate.sessions import keys
from sluicegate.sessions.runs import shown_info
from sluicegate.workers.worker import Worker
from tests.helpers import fast_settings, wait_for
from tests.worker_helpers import WorkerProcess

# rq has no cluster support (rq#1942): its presence lives on one server (on a cluster: --rq-redis-url).
pytestmark = pytest.mark.single_server


def rq_worker(url: str, name: str) -> RqWorker | None:
    connection = redis.Redis.from_url(url)
    try:
        return next((w for w in RqWorker.all(connection=connection) if w.name == name), None)
    finally:
        connection.close()


def test_worker_process_is_listed_by_rq_while_alive(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    settings = fast_settings(redis_url, group="gpu-a", slots=2, heartbeat_seconds=0.3)
    worker = WorkerProcess(settings, str(tmp_path / "worker.log"))
    try:
        wid = _registered_in(r, worker, "gpu-a")
        listed = wait_for(lambda: rq_worker(redis_url, wid), timeout=10, what="the worker in rq's registry")
        assert listed.queue_names() == ["sluicegate.gpu-a"]
        assert listed.get_state() == "idle"
        first: datetime = listed.last_heartbeat
        wait_for(lambda: (w := rq_worker(redis_url, wid)) is not None and w.last_heartbeat > first, timeout=10,
                 what="an rq heartbeat")
        assert 0 < r.ttl(listed.key) <= 70  # kept alive by heartbeats, gone soon after they stop

        rq_cli = shutil.which("rq", path=os.path.dirname(sys.executable))
        if rq_cli:  # the operators' view
            shown = subprocess.run([rq_cli, "info", "-W", "-u", redis_url], capture_output=True, text=True, timeout=30)
            assert wid in shown.stdout and "sluicegate.gpu-a" in shown.stdout, shown.stdout + shown.stderr

        # rq's registration lost (say Redis restarted empty): the next rq beat registers again
        r.delete(listed.key)
        r.srem("rq:workers", listed.key)
        wait_for(lambda: rq_worker(redis_url, wid) is not None, timeout=10, what="the rq registration to come back")

        worker.signal(signal.SIGTERM)
        assert worker.wait(15) == 0
        assert rq_worker(redis_url, wid) is None
        assert not r.hexists(keys.group_key("default", "workers"), wid)
    finally:
        worker.close()


def _registered_in(r: redis.Redis, worker: WorkerProcess, group: str) -> str:
    wid = worker.registered(r)
    assert shown_info(r.hget(keys.group_key(group, "workers"), wid))["slots"] == 2 and wid.startswith(f"{group}.")
    assert r.lrange(keys.group_key(group, "idle"), 0, -1) == [wid, wid]
    return wid


@pytest.mark.parametrize("standalone_rq", [False, True])
def test_on_a_cluster_rq_presence_goes_to_the_rq_server_or_is_off(redis_url: str, standalone_rq: bool) -> None:
    """rq has no cluster support: with --redis-cluster the presence uses --rq-redis-url (here the test's
    standalone server), and is off without it. The cluster URL is never dialled to build the worker."""
    settings = fast_settings("redis://127.0.0.1:2/0", redis_cluster=True,
                             rq_redis_url=redis_url if standalone_rq else None)
    worker = Worker(settings, use_rq=True)
    if not standalone_rq:
        assert worker.presence is None
    else:
        assert worker.presence is not None
        kwargs = worker.presence._connection.connection_pool.connection_kwargs
        assert f"redis://{kwargs['host']}:{kwargs['port']}/0" == redis_url
