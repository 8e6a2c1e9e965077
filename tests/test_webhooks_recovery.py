"""A healthy receiver loses nothing to how long its callbacks waited: a delivery outage longer than the whole
retry schedule fails none of them (a give-up counted from the request's end, tried at this stop, did: none is
kept), and a receiver that hung for a moment gets its backlog within about a timeout once it answers again (a push
moves a waiting callback at most about a --webhook-timeout, and a host's queue starts over once it is no
longer slow). Real Valkey, a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sluicegate.sessions import keys
from sluicegate.settings import Settings
from sluicegate.webhooks import delivery as delivery_module
from sluicegate.webhooks.delivery import Delivery
from tests.test_webhooks import hook_settings


class Receiver:
    """Answers 200 after `answer_s`; until `hang_until` (time.time()) it holds each request without answering
    (its attempt is cut at the timeout). Notes when each request id was first taken."""

    def __init__(self, *, answer_s: float = 0.01, hang_until: float = 0.0) -> None:
        self.taken: dict[str, float] = {}
        self.release = threading.Event()  # ends the hung handlers at teardown
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if time.time() < hang_until:
                    outer.release.wait(60)
                    return
                time.sleep(answer_s)
                outer.taken.setdefault(json.loads(body)["request_id"], time.time())
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def ended_with_callback(r, rid: str, url: str, *, ended_ms: int, ttl_ms: int) -> None:
    """A request that ended at `ended_ms` with its callback queued, due then, as the terminal step leaves it."""
    r.hset(keys.request(rid), mapping={"st": "done", "sid": f"s-{rid}", "tn": "t", "g": "default", "cb": url,
                                       "n": 1, "fin": ended_ms})
    r.pexpire(keys.request(rid), ttl_ms)
    r.zadd(keys.callbacks_due(keys.bucket_of_request(rid)), {rid: ended_ms})


def test_a_delivery_outage_past_the_retry_schedule_fails_nothing_to_a_healthy_receiver(redis_url: str, r) -> None:
    """150 callbacks to one receiver that answers in 20 ms, left due by a delivery outage: their requests
    ended 60 s ago, four times their whole retry schedule (15 s: one attempt of a 5-s timeout and a 10-s
    margin), and are kept 10 minutes more. Once a delivery process runs, each host gets PER_HOST places and
    HELD_PER_HOST held; the rest are pushed back a moment (LEAVE). All are delivered.
    (Before, the 46 beyond the 104 were failed unsent at once: "no place for it within 15 s of the request's
    end".)"""
    n = 150
    assert n > delivery_module.PER_HOST + delivery_module.HELD_PER_HOST
    receiver = Receiver(answer_s=0.02)
    ended_ms = int(time.time() * 1000) - 60_000
    rids = [f"{keys.all_buckets()[i % 7]}out{i}" for i in range(n)]
    pipe = r.pipeline(transaction=False)
    for rid in rids:
        ended_with_callback(pipe, rid, receiver.url, ended_ms=ended_ms, ttl_ms=600_000)
    pipe.execute()
    settings = hook_settings(redis_url, webhook_timeout=5.0, webhook_max_attempts=1, webhook_backoff=0.05)
    try:
        run_delivery(settings, poll_seconds=0.2, seconds=20.0,
                     until=lambda: all(r.hget(keys.request(rid), "cbs") for rid in rids))
    finally:
        receiver.stop()
    outcome = Counter(r.hget(keys.request(rid), "cbs") for rid in rids)
    errors = Counter(r.hget(keys.request(rid), "cbe") for rid in rids)
    assert outcome == {"delivered": n}, (outcome, errors)
    assert len(receiver.taken) == n


def test_a_receivers_short_hang_does_not_delay_its_backlog_past_about_a_timeout(redis_url: str, r) -> None:
    """Callbacks come at 40/s for 6 s to a receiver that hangs for its first 3 s, then answers in 10 ms
    (a 2-s timeout, 3 attempts: a 36.7-s whole schedule). Its hung attempts are all cut by HANG + timeout;
    what waited for it meanwhile was pushed back at most about a timeout, so every callback is delivered
    by then plus a timeout and a few seconds' slack. (Before, its backlog was pushed back by turns guessed
    while it hung, up to the whole schedule: the last ones were delivered about 37 s after their end.)"""
    hang, timeout, slack = 3.0, 2.0, 3.0
    t0 = time.time()
    receiver = Receiver(answer_s=0.01, hang_until=t0 + hang)
    recovered = t0 + hang + timeout  # the last hung attempt is cut by then: the host is no longer slow
    settings = hook_settings(redis_url, webhook_timeout=timeout, webhook_backoff=0.2, webhook_max_attempts=3)
    ended: dict[str, float] = {}

    async def produce() -> None:
        i = 0
        while time.time() < t0 + 6.0:
            for _ in range(4):
                rid = f"{keys.all_buckets()[i % 31]}hic{i}"
                i += 1
                now = time.time()
                ended_with_callback(r, rid, receiver.url, ended_ms=int(now * 1000), ttl_ms=600_000)
                ended[rid] = now
            await asyncio.sleep(0.1)

    try:
        run_delivery(settings, poll_seconds=0.5, seconds=t0 + 15.0 - time.time(), produce=produce,
                     until=lambda: len(receiver.taken) >= len(ended))
    finally:
        receiver.stop()
    late = {rid: round(receiver.taken[rid] - max(at, recovered), 1) if rid in receiver.taken else None
            for rid, at in ended.items()}
    too_late = {rid: after for rid, after in late.items() if after is None or after > timeout + slack}
    assert len(ended) > 200
    assert not too_late, (len(too_late), sorted(too_late.items(), key=str)[:10])


def run_delivery(settings: Settings, *, poll_seconds: float, seconds: float, until, produce=None) -> None:
    """One delivery process (beside `produce`, awaited first) for up to `seconds`, or until `until()`."""

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(Delivery(settings, poll_seconds=poll_seconds).run(stop))
        deadline = time.monotonic() + seconds
        if produce is not None:
            await produce()
        while time.monotonic() < deadline and not until():
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
