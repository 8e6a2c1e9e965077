"""A callback survives an outage of the delivery process shorter than the session's TTL around its retry's
due time, and a 2xx whose body is cut short or too slow delivers it. Real Valkey, real local receivers."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sluicegate.sessions import callbacks, keys
from sluicegate.sessions.connect import async_client
from sluicegate.webhooks.delivery import Delivery
from tests.helpers import ON_CLUSTER, read_http_request, submit, wait_for
from tests.test_webhooks import delivered, start_stack, status
from tests.webhook_receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


def test_a_retry_due_while_the_delivery_process_is_down_less_than_a_ttl_is_still_made(
        redis_url: str, r, receiver: Receiver) -> None:
    """The first attempt fails, and the process is down from before its retry is due until that time and a
    lease (10.5 s) have passed, which is less than the session's TTL (12 s) past it. The restarted process
    still finds the request. (Before, a retry kept it only a lease past its due time: expired, dropped.)"""
    receiver.statuses = [500, 200]
    stack = start_stack(redis_url, session_ttl=12, webhook_timeout=0.5, webhook_backoff=2.0)
    lease_seconds = 0.5 + 10  # webhook_timeout + 10 s (Delivery.lease_ms)
    try:
        rid = submit(stack.base_url, "outage-1", max_tokens=2, callback_url=f"{receiver.url}/late")
        wait_for(lambda: status(stack, rid)["callback"]["last_error"] == "HTTP 500", what="the first failure")
        due = r.zscore(keys.callbacks_due(keys.bucket_of_request(rid)), rid) / 1000  # the retry's
        stack.stop_service("webhooks")
        assert time.time() < due  # down before the retry is due (backoff 2 s, less 10 % at most)
        time.sleep(due + lease_seconds + 0.5 - time.time())
        assert r.exists(keys.request(rid)), "the request expired while the delivery process was down"
        stack.start_service("webhooks", Delivery(stack.settings, poll_seconds=0.05).run)
        view = wait_for(lambda: delivered(stack, rid), timeout=10, what="the retry after the restart")
        assert view["callback"]["status"] == "delivered" and view["callback"]["attempts"] == 2
        assert len(receiver.to("/late")) == 2
    finally:
        stack.stop()


def test_a_queued_callbacks_request_is_kept_a_ttl_past_its_due_time_and_a_settled_ones_no_more(
        redis_url: str, r) -> None:
    """The scripts themselves, with a TTL longer than the lease: a claim keeps the request until its lease ends
    and a TTL more, a push-back until it is due and a TTL more, a retry likewise; a final outcome gives back what
    the claim added: kept a lease more, or until its own expiry (the TTL it ended with) when that is later."""
    bucket = keys.all_buckets()[9]
    now = int(time.time() * 1000)
    lease, ttl = 5_000, 60_000
    ended_at = {"claimed": now - 1_000, "pushed": now - 1_000, "retried": now - 1_000, "fresh": now - 1_000,
                "old": now - ttl - 10_000}
    rids = {name: f"{bucket}{name}" for name in ended_at}
    for name, rid in rids.items():
        r.hset(keys.request(rid), mapping={"cb": "http://127.0.0.1/h", "fin": ended_at[name] + 0.5})
        r.pexpire(keys.request(rid), max(ended_at[name] + ttl - now, 1_000))  # its own TTL, from its end
        r.zadd(keys.callbacks_due(bucket), {rid: now - 100})

    async def scripts() -> None:
        client = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            for name in ("claimed", "retried", "fresh", "old"):
                assert await callbacks.claim(client, rids[name], now_ms=now, lease_ms=lease, session_ttl_ms=ttl)
            await callbacks.push_back(client, {rids["pushed"]: now + 5_000}, [], now_ms=now, lease_ms=lease,
                                      session_ttl_ms=ttl)
            await callbacks.settle(client, rids["retried"], 1, "retry", "HTTP 500", now + 90_000,
                                   keep_ms=90_000 + ttl)
            for name in ("fresh", "old"):
                await callbacks.settle(client, rids[name], 1, "delivered", keep_ms=lease)
        finally:
            await client.aclose()

    asyncio.run(scripts())
    kept = {name: r.pttl(keys.request(rid)) for name, rid in rids.items()}
    assert lease + ttl - 2_000 < kept["claimed"] <= lease + ttl
    assert 5_000 + ttl - 2_000 < kept["pushed"] <= 5_000 + ttl
    assert 90_000 + ttl - 2_000 < kept["retried"] <= 90_000 + ttl
    assert ttl - 1_000 - 2_000 < kept["fresh"] <= ttl - 1_000  # its own TTL: later than a lease
    assert lease - 2_000 < kept["old"] <= lease  # a lease: its own TTL is over
    assert not any(r.hexists(keys.request(rid), "cbx") for rid in (rids["fresh"], rids["old"]))  # settled: given back


def test_a_delivered_callbacks_request_keeps_its_own_ttl_not_the_delivery_processs(redis_url: str, r,
                                                                                   receiver: Receiver) -> None:
    """The request ends with its stack's session TTL (3600 s); the delivery process runs with a 60-s one
    (`sluicegate webhooks --session-ttl 60`). Once the callback is delivered the request keeps about its own
    TTL, and GET shows nothing of what the delivery recorded. (Before, the settle cut it to its end plus the
    delivery process's TTL: gone ~59 min early.)"""
    stack = start_stack(redis_url, delivery=False)
    try:
        assert stack.settings.session_ttl == 3600
        rid = submit(stack.base_url, "own-ttl-1", max_tokens=2, callback_url=f"{receiver.url}/own")
        wait_for(lambda: status(stack, rid)["status"] == "done", what="the request's end")
        assert r.pttl(keys.request(rid)) > 3_590_000
        stack.start_service("webhooks", Delivery(stack.settings.replace(session_ttl=60), poll_seconds=0.05).run)
        view = wait_for(lambda: delivered(stack, rid), what="the delivery")
        assert view["callback"]["status"] == "delivered"
        assert r.pttl(keys.request(rid)) > 3_500_000, "the delivery process's --session-ttl cut the request's TTL"
        assert not r.hexists(keys.request(rid), "cbx")
        assert "cbx" not in json.dumps(status(stack, rid))
    finally:
        stack.stop()


class CutShort:
    """A receiver that reads each request whole, answers `200` announcing a 100-byte body, then sends none of
    it: it closes the connection (`hold` False) or keeps it open until stopped."""

    def __init__(self, *, hold: bool) -> None:
        self.hold = hold
        self.posts = 0
        self.stopped = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # stopped
                return
            threading.Thread(target=self.answer, args=(connection,), daemon=True).start()

    def answer(self, connection: socket.socket) -> None:
        with connection:
            read_http_request(connection)
            self.posts += 1
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            if self.hold:
                self.stopped.wait()

    def stop(self) -> None:
        self.stopped.set()
        self.server.close()


@pytest.mark.parametrize("hold", [False, True], ids=["closed", "too-slow"])
def test_a_2xx_whose_body_is_cut_short_delivers_the_callback(redis_url: str, hold: bool) -> None:
    """The status is a 2xx: the receiver took the callback, whatever then happens to the rest of the body
    (the peer closes: RemoteProtocolError; it never comes: the attempt's cap). (Before, either was a failed
    attempt: three POSTs, and the callback failed.)"""
    cut = CutShort(hold=hold)
    stack = start_stack(redis_url, webhook_timeout=1.0, webhook_max_attempts=3)
    try:
        rid = submit(stack.base_url, f"cut-{hold}", max_tokens=2, callback_url=f"{cut.url}/h")
        view = wait_for(lambda: delivered(stack, rid), timeout=20, what="the callback's outcome")
        assert view["callback"] == {"url": f"{cut.url}/h", "status": "delivered", "attempts": 1, "last_error": None}
        assert cut.posts == 1
    finally:
        cut.stop()
        stack.stop()
