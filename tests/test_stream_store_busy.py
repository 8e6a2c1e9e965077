"""A live stream whose log read fails because the store cannot answer for a moment (a long script: BUSY;
a restart still loading its AOF: LOADING; a cluster client out of connections) waits and reads again,
pinging meanwhile: the old code ended every such stream at once, and an EventSource's reconnect then got
the 503 at which it stops for good. Real Valkey, made busy by a real script."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from tests.helpers import SseEvent, Stack, fast_settings, sse, submit, wait_for

pytestmark = pytest.mark.single_server  # one server made busy

BUSY = "local t = redis.call('TIME')[1] while tonumber(redis.call('TIME')[1]) < t + 2 do end return 1"


def test_a_live_stream_outlasts_a_store_that_answers_busy(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, sse_ping_seconds=0.3)).start(workers=1)  # idle rereads every 0.3 s
    try:
        first = submit(stack.base_url, "busy", max_tokens=2)
        events = list(sse(stack.base_url, f"/v1/requests/{first}/events", timeout=20))
        received: list[SseEvent] = []
        follower = threading.Thread(target=lambda: received.extend(sse(
            stack.base_url, "/v1/sessions/busy/events", last_id=events[-1].id, timeout=30,
            until=lambda e: e.event == "done")), daemon=True)
        follower.start()
        time.sleep(0.5)  # the stream is live and idle: it reads the log each 0.3 s
        r.config_set("busy-reply-threshold", 100)
        busy = threading.Thread(target=lambda: redis.Redis.from_url(redis_url).eval(BUSY, 0), daemon=True)
        try:
            busy.start()
            time.sleep(1.0)  # its idle rereads meet BUSY
            assert follower.is_alive(), "the stream ended while the store was busy"
            busy.join()
        finally:
            r.config_set("busy-reply-threshold", 5000)
        second = wait_for(lambda: submit_or_none(stack.base_url), timeout=20, what="a submit once the store answers")
        follower.join(30)
        assert [e.data["request_id"] for e in received if e.event == "done"] == [second]
        assert [e.event for e in received][:2] == ["queued", "started"]
    finally:
        stack.stop()


def submit_or_none(base_url: str) -> str | None:
    try:
        return submit(base_url, "busy", max_tokens=2)
    except AssertionError:
        return None
