"""The rq server (--rq-redis-url; on a cluster a standalone server of its own) is only the operators' view: a
worker starts and serves with it down, joins rq when it is back, and its shutdown does not wait long for an rq
server that stopped answering. rq's Worker talked to its server in the worker's constructor, which then
raised (the worker process died before it served), and the shutdown waited ~11 s for rq's goodbye."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
import redis
from rq import Worker as RqWorker

from sluicegate.sessions import keys
from sluicegate.settings import Settings
from sluicegate.workers.worker import Worker
from tests.cutting_proxy import CuttingProxy
from tests.helpers import Stack, call, fast_settings, submit, wait_for

# rq has no cluster support (rq#1942): its presence lives on one server (as in test_rq_presence).
pytestmark = pytest.mark.single_server


@pytest.fixture
def proxy(redis_url: str) -> Iterator[CuttingProxy]:
    """The rq server, down at first (`refuse`), in front of the test server (which keeps rq's registry)."""
    running = CuttingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    running.refuse = True
    yield running
    running.cut()
    running.close()


def rq_url(proxy: CuttingProxy) -> str:
    return f"redis://127.0.0.1:{proxy.port}/0"


def in_rq(redis_url: str, name: str) -> bool:
    """Whether rq's registry (kept on the test server, behind the proxy) lists worker `name`."""
    connection = redis.Redis.from_url(redis_url)
    try:
        return any(w.name == name for w in RqWorker.all(connection=connection))
    finally:
        connection.close()


def start_worker(stack: Stack, settings: Settings) -> Worker:
    """A worker with its rq presence (the stack's own have none), serving once it has offered its slots."""

    async def make() -> Worker:
        return Worker(settings)

    worker = stack._call(make())
    stack.workers[worker.worker_id] = worker
    stack.start_service(worker.worker_id, worker.run)
    wait_for(lambda: stack._call(worker.redis.exists(keys.worker(settings.group, worker.worker_id))),
             what="the worker to offer its slots")
    return worker


def test_a_worker_serves_with_rq_down_and_joins_rq_when_it_is_back(redis_url: str, proxy: CuttingProxy) -> None:
    settings = fast_settings(redis_url, rq_redis_url=rq_url(proxy))
    stack = Stack(settings).start(workers=0)
    try:
        worker = start_worker(stack, settings)
        rid = submit(stack.base_url, "rq-down", prompt="x", max_tokens=20)
        wait_for(lambda: call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "done", timeout=20,
                 what="the request to be served")
        assert not in_rq(redis_url, worker.worker_id)

        proxy.refuse = False  # the rq server is back: the presence's next beat registers the worker
        wait_for(lambda: in_rq(redis_url, worker.worker_id), timeout=20, what="the worker to join rq")
    finally:
        stack.stop()


def test_a_shutdown_does_not_wait_long_for_an_rq_server_that_stopped_answering(
        redis_url: str, proxy: CuttingProxy, caplog: pytest.LogCaptureFixture) -> None:
    proxy.refuse = False
    settings = fast_settings(redis_url, rq_redis_url=rq_url(proxy))
    stack = Stack(settings).start(workers=0)
    try:
        worker = start_worker(stack, settings)
        wait_for(lambda: in_rq(redis_url, worker.worker_id), timeout=20, what="the worker to join rq")
        assert worker.presence is not None
        death, left = worker.presence.death, threading.Event()

        def recorded_death() -> None:
            try:
                death()
            finally:
                left.set()

        worker.presence.death = recorded_death  # type: ignore[method-assign]
        proxy.black_hole = True  # the rq server's host is gone
        with caplog.at_level(logging.WARNING, logger="sluicegate.workers.worker"):
            stack.stop_service(worker.worker_id)
        # the worker's run() returned with rq's goodbye still on its way (it expires in rq on its own)
        assert not left.is_set()
        assert any("rq did not answer" in rec.getMessage() for rec in caplog.records)
        assert in_rq(redis_url, worker.worker_id)
    finally:
        proxy.black_hole, proxy.refuse = False, True
        proxy.cut()  # rq's goodbye fails now, and its thread ends
        stack.stop()
    assert left.wait(30)  # its thread ended: nothing of this test is left running
