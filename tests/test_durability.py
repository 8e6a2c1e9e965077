"""Accepted means durable: a 202 survives a crash (kill -9) of the embedded server with AOF, and
the API, scheduler and workers carry on against the restarted server without being restarted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sluicegate.embedded import EmbeddedServer, free_port
from sluicegate.sessions import keys
from tests.helpers import SseEvent, Stack, call, fast_settings, sse, wait_for

pytestmark = pytest.mark.single_server  # crashes and restarts the one server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """Our own persistent server (fsync on every write) on a fixed port, so it can restart in place."""
    running = EmbeddedServer(data_dir=str(tmp_path / "aof"), port=free_port(), persistent=True,
                             appendfsync="always").start()
    yield running
    running.stop()


def crash_and_restart(server: EmbeddedServer) -> EmbeddedServer:
    server.kill()
    assert server.process is not None and server.process.returncode is not None
    probe = redis.Redis(host=server.host, port=server.port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        probe.ping()
    server.process = None
    return server.start()  # same port, same data dir


def test_accepted_request_survives_a_crash(server: EmbeddedServer) -> None:
    stack = Stack(fast_settings(server.url)).start(workers=0)
    try:
        code, reply = call("POST", f"{stack.base_url}/v1/sessions/durable/requests",
                           {"prompt": "keep me", "max_tokens": 25})
        assert code == 202, reply
        rid = reply["request_id"]
        crash_and_restart(server)

        # the very first call after the restart answers: a dead pooled connection is replaced, not a 503
        code, view = call("GET", f"{stack.base_url}/v1/requests/{rid}")
        assert code == 200 and view["status"] == "queued" and view["max_tokens"] == 25, view
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert client.get(keys.request_input(rid)) == "keep me"
            assert client.lrange(keys.session_queue("durable"), 0, -1) == [rid]
        finally:
            client.close()
        (queued,) = list(sse(stack.base_url, f"/v1/requests/{rid}/events", stop_after=1, timeout=10))
        assert queued.event == "queued" and queued.id == 1 and queued.data["request_id"] == rid

        stack.add_worker()
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=30))
        assert [e.event for e in events[:2]] == ["queued", "started"] and events[-1].event == "done"
        assert [e.data["index"] for e in events if e.event == "token"] == list(range(25))
        assert call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "done"
    finally:
        stack.stop()


def test_running_processes_survive_a_server_restart(server: EmbeddedServer) -> None:
    """API (with a live SSE client), scheduler and a worker keep running across the crash: the hub
    resubscribes, the worker's inbox and control loops come back, and new work flows end to end."""
    stack = Stack(fast_settings(server.url)).start(workers=1)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        (wid,) = stack.workers
        base = stack.base_url
        code, reply = call("POST", f"{base}/v1/sessions/live/requests", {"prompt": "before", "max_tokens": 10})
        assert code == 202
        before = list(sse(base, f"/v1/requests/{reply['request_id']}/events", timeout=20))
        assert before[-1].event == "done"

        live: list[SseEvent] = []
        listener = threading.Thread(target=lambda: live.extend(sse(
            base, "/v1/sessions/live/events", last_id=before[-1].id, timeout=60,
            until=lambda e: e.event == "done")), daemon=True)
        listener.start()
        wait_for(lambda: call("GET", f"{base}/healthz")[1]["open_streams"] == 1, what="the SSE client to connect")
        wait_for(lambda: client.pubsub_shardnumsub(keys.session_channel("live"))[0][1] == 1,
                 what="the hub to subscribe")
        time.sleep(0.2)  # past the backlog read: the client now waits on live events only

        crash_and_restart(server)
        # every subscriber comes back: the API hub (the session's channel) and the worker's control
        # channel (instant preempt/cancel)
        for channel in (keys.session_channel("live"), keys.worker_control("default", wid)):
            wait_for(lambda channel=channel: client.pubsub_shardnumsub(channel)[0][1] == 1, timeout=15,
                     interval=0.1, what=f"a subscriber on {channel} after the restart")
        wait_for(lambda: client.exists(keys.worker("default", wid)), timeout=10, what="the worker's heartbeat")

        code, reply = call("POST", f"{base}/v1/sessions/live/requests", {"prompt": "after", "max_tokens": 30})
        assert code == 202, reply
        rid = reply["request_id"]
        listener.join(30)
        assert not listener.is_alive(), f"the SSE client never saw the new request finish: {live[-3:]}"
        mine = [e for e in live if e.data["request_id"] == rid]
        assert [e.event for e in mine[:2]] == ["queued", "started"] and mine[-1].event == "done"
        assert mine[1].data["worker"] == wid, "the request did not run on the worker that lived through the crash"
        assert [e.data["index"] for e in mine if e.event == "token"] == list(range(30))
        # the first id after a restart skips a million (sessions/lua/includes/log_ids.lua), then runs on
        first_after = before[-1].id + 1_000_000 + 1
        assert [e.id for e in live] == list(range(first_after, first_after + len(live)))

        # and a cancel still reaches the worker at once over its control channel
        code, reply = call("POST", f"{base}/v1/sessions/live/requests", {"prompt": "long", "max_tokens": 4000})
        long_rid = reply["request_id"]
        wait_for(lambda: call("GET", f"{base}/v1/requests/{long_rid}")[1]["tokens"] > 0, what="the long run")
        assert call("DELETE", f"{base}/v1/requests/{long_rid}")[0] == 200
        worker = stack.workers[wid]
        wait_for(lambda: not worker.runs, timeout=5, what="the worker to drop the cancelled run")
        wait_for(lambda: client.llen("sg:{g:default}:idle") == 4, what="the slot to come back")
    finally:
        client.close()
        stack.stop()


def test_run_in_flight_survives_a_crash(server: EmbeddedServer) -> None:
    """The server dies in the middle of a run: no token is lost or doubled, the request still
    completes (resuming from the tokens already stored), and the worker gets its slot back."""
    stack = Stack(fast_settings(server.url)).start(workers=1)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        (wid,) = stack.workers
        base = stack.base_url
        code, reply = call("POST", f"{base}/v1/sessions/inflight/requests", {"prompt": "long", "max_tokens": 600})
        assert code == 202
        rid = reply["request_id"]
        received: list[SseEvent] = []
        listener = threading.Thread(target=lambda: received.extend(sse(base, f"/v1/requests/{rid}/events",
                                                                       timeout=60)), daemon=True)
        listener.start()
        wait_for(lambda: len(received) > 40, what="tokens before the crash")
        crash_and_restart(server)
        listener.join(40)
        assert not listener.is_alive(), f"the live client never saw the end: {received[-3:]}"
        if received[-1].event != "done":  # the stream was cut by the crash: resume from where it stopped
            received += list(sse(base, f"/v1/requests/{rid}/events", last_id=received[-1].id, timeout=40))
        assert received[-1].event == "done", received[-3:]
        assert [e.data["index"] for e in received if e.event == "token"] == list(range(600))
        ids = [e.id for e in received]
        assert ids == sorted(set(ids))
        code, view = call("GET", f"{base}/v1/requests/{rid}")
        assert view["status"] == "done" and view["tokens"] == 600, view
        wait_for(lambda: client.llen("sg:{g:default}:idle") == 4, timeout=10,
                 what="every slot of the worker to come back")
        assert set(client.lrange("sg:{g:default}:idle", 0, -1)) == {wid}
    finally:
        client.close()
        stack.stop()


def test_live_client_gets_events_published_while_the_hub_was_reconnecting(server: EmbeddedServer) -> None:
    """Events appended after the restart but before the API's hub resubscribed were never delivered
    live: a client waiting on live events must still get them (the hub sends it back to the log)."""
    stack = Stack(fast_settings(server.url)).start(workers=0)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        base = stack.base_url
        assert call("POST", f"{base}/v1/sessions/gap/requests", {"prompt": "one", "max_tokens": 5})[0] == 202
        received: list[SseEvent] = []
        listener = threading.Thread(target=lambda: received.extend(sse(
            base, "/v1/sessions/gap/events", timeout=30, stop_after=2)), daemon=True)
        listener.start()
        wait_for(lambda: len(received) == 1 and client.pubsub_shardnumsub(keys.session_channel("gap"))[0][1] == 1,
                 what="live wait")
        crash_and_restart(server)
        # at once: the hub is usually still backing off, so this event is published to no one
        code, reply = call("POST", f"{base}/v1/sessions/gap/requests", {"prompt": "two", "max_tokens": 5})
        assert code == 202, reply
        listener.join(15)
        assert not listener.is_alive(), "the queued event published during the hub's reconnect never arrived"
        # its id: the first after a restart skips a million (sessions/lua/includes/log_ids.lua)
        assert [(e.id, e.event, e.data["request_id"]) for e in received][1] == (1_000_002, "queued",
                                                                                 reply["request_id"])
    finally:
        client.close()
        stack.stop()


def test_aof_window_is_documented_by_the_setting(server: EmbeddedServer) -> None:
    """With appendfsync always, even the last write before the crash is on disk."""
    client = redis.Redis.from_url(server.url)
    try:
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("sg:probe", "x")
    finally:
        client.close()
    crash_and_restart(server)
    client = redis.Redis.from_url(server.url)
    try:
        assert client.get("sg:probe") == b"x"
    finally:
        client.close()
