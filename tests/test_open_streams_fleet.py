"""`sluicegate_open_streams` is the fleet's: API processes behind one port (`--api-processes N`) each
answer some scrapes, so each publishes its count to Redis (`sg:api_streams`) and /metrics sums the live
entries; a dead process's lapsed entry is neither counted nor kept."""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings, submit, wait_for
from tests.metrics_helpers import scrape, total


@contextmanager
def open_streams(base_url: str, sessions: list[str]) -> Iterator[None]:
    """One SSE stream per session, held open (their requests stay queued: no worker) until the block ends."""
    host, port = base_url.removeprefix("http://").split(":")
    connections = []
    try:
        for sid in sessions:
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            connections.append(connection)
            connection.request("GET", f"/v1/sessions/{sid}/events")
            assert connection.getresponse().status == 200
        yield
    finally:
        for connection in connections:
            connection.close()


def streams_gauge(base_url: str) -> float:
    return total(scrape(base_url), "sluicegate_open_streams")


def local_streams(base_url: str) -> int:
    return int(call("GET", f"{base_url}/healthz")[1]["open_streams"])


def test_every_api_process_reports_the_fleets_open_streams(redis_url: str) -> None:
    settings = fast_settings(redis_url)
    first = Stack(settings).start(workers=0)
    second = Stack(settings).start(scheduler=False, workers=0)  # a second API process on the same store
    try:
        sessions = [f"fleet-{i}" for i in range(3)]
        for sid in sessions:
            submit(first.base_url, sid, max_tokens=5)
        with open_streams(first.base_url, sessions[:1]), open_streams(second.base_url, sessions[1:]):
            wait_for(lambda: local_streams(first.base_url) == 1 and local_streams(second.base_url) == 2,
                     what="the streams to open")
            time.sleep(1.5)  # past a publishing beat of each process
            # each process keeps its own figure in /healthz; /metrics reports the fleet's from either
            assert (local_streams(first.base_url), local_streams(second.base_url)) == (1, 2)
            assert (streams_gauge(first.base_url), streams_gauge(second.base_url)) == (3.0, 3.0)
        wait_for(lambda: (streams_gauge(first.base_url), streams_gauge(second.base_url)) == (0.0, 0.0),
                 timeout=10, interval=0.1, what="the closed streams to leave the fleet's count")
    finally:
        second.stop()
        first.stop()


def test_a_dead_processs_entry_lapses_and_a_stopped_one_withdraws(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0)
    try:
        now = int(time.time() * 1000)
        r.hset(keys.API_STREAMS, mapping={"gone:1:dead": f"7 {now - 1000}", "live:2:peer": f"2 {now + 60_000}"})
        assert streams_gauge(stack.base_url) == 2.0  # the live peer's 2, not the lapsed 7
        fields = set(r.hkeys(keys.API_STREAMS))
        assert "gone:1:dead" not in fields and "live:2:peer" in fields
        mine = wait_for(lambda: fields_but(r, {"live:2:peer"}), what="the API process to publish its entry")
        assert r.hget(keys.API_STREAMS, next(iter(mine))).split()[0] == "0"
    finally:
        stack.stop()
    assert set(r.hkeys(keys.API_STREAMS)) == {"live:2:peer"}  # the stopped process withdrew its entry


def fields_but(r: redis.Redis, known: set[str]) -> set[str]:
    return set(r.hkeys(keys.API_STREAMS)) - known
