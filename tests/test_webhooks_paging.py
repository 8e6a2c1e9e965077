"""A host's backlog at the front of a bucket holds back no other host's callback in that bucket, with the
production constants (BATCH, HELD_PER_HOST, PAGES, the 1-s poll): a pass pages on through a bucket while every
callback it read waits for its host (held, or pushed back behind what is due), so the other host's callback
is read within a pass or two; and a fast host's backlog drains through early passes, not a read a poll.
Real Valkey, real HTTP receivers on 127.0.0.1 (the other host is `localhost`: another host, one loopback)."""

from __future__ import annotations

import asyncio
import time

import httpx

from sluicegate.sessions import keys
from sluicegate.webhooks import delivery as delivery_module
from sluicegate.webhooks.delivery import Delivery
from tests.test_webhooks import hook_settings
from tests.test_webhooks_recovery import Receiver, ended_with_callback, run_delivery

BUCKET = "aa"


def backlog_in_one_bucket(r, url: str, n: int) -> list[str]:
    """`n` callbacks to `url`, all in BUCKET, due for the last 5 s (oldest first), as an outage leaves them."""
    now_ms = int(time.time() * 1000)
    rids = [f"{BUCKET}back{i:06d}" for i in range(n)]
    pipe = r.pipeline(transaction=False)
    for i, rid in enumerate(rids):
        ended_with_callback(pipe, rid, f"{url}/{i}", ended_ms=now_ms - 5000 + i * 5000 // n, ttl_ms=600_000)
    pipe.execute()
    return rids


def other_hosts_wait(redis_url: str, r, *, answer_s: float, n: int) -> tuple[float, int]:
    """How long (s) the one callback to another host, behind `n` callbacks to a receiver that answers in
    `answer_s`, all in one bucket, took to be delivered (at most 10 s here), and how many of the backlog were."""
    busy, other = Receiver(answer_s=answer_s), Receiver(answer_s=0.0)
    try:
        backlog_in_one_bucket(r, busy.url, n)
        behind = f"{BUCKET}otherhost"
        ended_with_callback(r, behind, other.url.replace("127.0.0.1", "localhost"), ended_ms=int(time.time() * 1000),
                            ttl_ms=600_000)
        settings = hook_settings(redis_url, webhook_allow="127.0.0.1,localhost", webhook_timeout=5.0)
        began = time.time()
        run_delivery(settings, poll_seconds=delivery_module.POLL_SECONDS, seconds=10.0,
                     until=lambda: behind in other.taken)
        return (other.taken[behind] - began if behind in other.taken else float("inf")), len(busy.taken)
    finally:
        busy.stop()
        other.stop()


def test_a_fast_hosts_large_backlog_hides_no_other_hosts_callback(redis_url: str, r) -> None:
    """1,500 callbacks to a receiver that answers at once, then one to another host, in one bucket. Old: the
    bucket drained oldest first about BATCH a poll (a pass held at most 96, under HELD_PER_HOST, so no early
    pass came): the other host's callback waited 15.6 s; with no backlog it takes 0.1 s."""
    assert delivery_module.HELD_PER_HOST + delivery_module.PER_HOST >= delivery_module.BATCH  # the case this is
    took, sent = other_hosts_wait(redis_url, r, answer_s=0.0, n=1500)
    assert took < 4.0, (took, sent)  # about a couple of polls (a pass pages past PAGES * BATCH of them)
    assert sent < 1500, sent  # delivered well before the backlog was through


def test_a_busy_hosts_large_backlog_hides_no_other_hosts_callback(redis_url: str, r) -> None:
    """1,500 callbacks to a receiver that answers 200 after 1.5 s (slow: its callbacks are pushed back), then
    one to another host, in one bucket. Old: a pass pushed back only the BATCH it read, the older unread part
    stayed in front: the other host's callback waited 29 s."""
    took, sent = other_hosts_wait(redis_url, r, answer_s=1.5, n=1500)
    assert took < 4.0, (took, sent)


def test_a_fast_hosts_backlog_drains_faster_than_a_read_a_poll(redis_url: str, r) -> None:
    """600 callbacks in one bucket to a receiver that answers in 5 ms, with the production poll (1 s). Old: a
    pass started PER_HOST and held the rest of its BATCH (no LEAVE, so no early pass): BATCH a poll, 6 s."""
    n = 600
    receiver = Receiver(answer_s=0.005)
    try:
        rids = backlog_in_one_bucket(r, receiver.url, n)
        began = time.time()
        run_delivery(hook_settings(redis_url, webhook_timeout=5.0), poll_seconds=delivery_module.POLL_SECONDS,
                     seconds=15.0, until=lambda: len(receiver.taken) >= n)
        took = max(receiver.taken.values(), default=float("inf")) - began
    finally:
        receiver.stop()
    assert len(receiver.taken) == n and took < 3.0, (len(receiver.taken), took)
    assert all(r.hget(keys.request(rid), "cbs") == "delivered" for rid in rids)


def test_every_backlogged_bucket_is_paged_in_its_turn(redis_url: str, r) -> None:
    """More backlogged buckets than a pass's paging budget (PAGED) reaches: 30 buckets with 250 callbacks due
    each, to one host. Two passes page past the first page of all 30 (the next pass pages on from the bucket
    after the last one paged), so another host's callback behind a backlog in a late bucket waits no longer
    than in an early one. Old: every pass paged the first PAGED / BATCH (20) in bucket order, the same ones,
    never the other 10."""
    buckets = keys.all_buckets()[:30]
    assert len(buckets) * delivery_module.BATCH > delivery_module.PAGED  # the case this is
    receiver = Receiver(answer_s=0.0)
    now_ms = int(time.time() * 1000)
    pipe = r.pipeline(transaction=False)
    for bucket in buckets:
        for i in range(250):
            ended_with_callback(pipe, f"{bucket}back{i:06d}", f"{receiver.url}/{bucket}/{i}",
                                ended_ms=now_ms - 5000 + i, ttl_ms=600_000)
    pipe.execute()
    paged: list[str] = []

    async def two_passes() -> None:
        delivery = Delivery(hook_settings(redis_url, webhook_timeout=5.0))
        read_more = delivery.read_more

        async def noted(more: list[str], now_ms: int) -> list[str]:
            paged.extend(more)
            return await read_more(more, now_ms)

        delivery.read_more = noted  # type: ignore[method-assign]
        try:
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
                for _ in range(2):
                    await delivery.deliver_due(http)
                await delivery.drain(5.0)
        finally:
            await delivery.redis.aclose()

    try:
        asyncio.run(two_passes())
    finally:
        receiver.stop()
    assert not set(buckets) - set(paged), sorted(set(buckets) - set(paged))
