"""Callbacks that wait for their receiver's host (pushed back, or held by the delivery process) keep their
request past a short session TTL: a backlog longer than the TTL, while a delivery process runs the whole
time, drops no callback and loses no outcome. Real Valkey, real local receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import pytest

from sluicegate.sessions import callbacks, keys
from sluicegate.sessions.connect import async_client
from sluicegate.webhooks import delivery as delivery_module
from sluicegate.webhooks.delivery import Delivery
from tests.helpers import ON_CLUSTER, Stack, call, submit, wait_for
from tests.test_webhooks import BlackHole, ended_requests, start_stack, status


def outcome(stack: Stack, rid: str) -> str:
    """The callback's status, or "gone" when its request expired (with the callback, dropped)."""
    code, view = call("GET", f"{stack.base_url}/v1/requests/{rid}")
    if code == 404:
        return "gone"
    assert code == 200, view
    return view["callback"]["status"]


def all_delivered(stack: Stack, rids: list[str], timeout: float) -> None:
    wait_for(lambda: all(outcome(stack, rid) != "pending" for rid in rids), timeout=timeout, what="every outcome")
    outcomes = [outcome(stack, rid) for rid in rids]
    assert outcomes.count("delivered") == len(rids), {o: outcomes.count(o) for o in set(outcomes)}


def test_a_slow_receivers_backlog_longer_than_the_session_ttl_drops_no_callback(redis_url: str) -> None:
    """A receiver that answers in 1.5 s (slow: its waiting callbacks are pushed back in the store), 16
    callbacks, 4 at once: about 6 s of backlog against a 2-s session TTL. (Before the push-back kept the
    requests, the last rounds' requests expired while they waited: 8 of 16 dropped, 404.)"""
    slow = BlackHole(answer_after=1.5)
    stack = start_stack(redis_url, delivery=False, session_ttl=2, webhook_timeout=3.0)
    try:
        rids = ended_requests(stack, slow.url, 4 * delivery_module.PER_HOST)
        stack.start_service("webhooks", Delivery(stack.settings, poll_seconds=0.05).run)
        all_delivered(stack, rids, timeout=30)
        assert slow.accepted == len(rids) and slow.most_open <= delivery_module.PER_HOST
    finally:
        slow.stop()
        stack.stop()


def test_callbacks_held_for_a_busy_receiver_longer_than_the_session_ttl_are_not_dropped(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver that answers in 0.5 s, never slow here: its waiting callbacks are held by the process,
    due and unclaimed, about 3 s of them against a 2-s session TTL. Each pass keeps their requests."""
    monkeypatch.setattr(delivery_module, "SLOW_AFTER_SECONDS", 30.0)  # held, never pushed back
    busy = BlackHole(answer_after=0.5)
    stack = start_stack(redis_url, delivery=False, session_ttl=2)
    try:
        rids = ended_requests(stack, busy.url, 6 * delivery_module.PER_HOST)
        stack.start_service("webhooks", Delivery(stack.settings, poll_seconds=0.05).run)
        all_delivered(stack, rids, timeout=30)
        assert busy.accepted == len(rids)
    finally:
        busy.stop()
        stack.stop()


def test_push_back_moves_only_queued_callbacks_later_and_keeps_their_requests(redis_url: str, r) -> None:
    """The script itself, one pipeline: a queued callback is due later and its request kept until then and
    a lease more; a held one (due 0) stays due and is kept a lease; one due later (claimed since, or a retry)
    keeps its time; a settled one is not queued again; a TTL is never shortened, nor given to a key without."""
    bucket = keys.all_buckets()[7]
    now = int(time.time() * 1000)
    lease = 20_000
    rids = {name: f"{bucket}{name}" for name in ("pushed", "held", "later", "settled", "kept")}
    due = {"pushed": now - 100, "held": now - 100, "later": now + 60_000, "kept": now - 100}
    for name, rid in rids.items():
        r.hset(keys.request(rid), "cb", "http://127.0.0.1/h")
        if name != "kept":
            r.pexpire(keys.request(rid), 1_000)
        if name in due:
            r.zadd(keys.callbacks_due(bucket), {rid: due[name]})

    async def push() -> None:
        client = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            await callbacks.push_back(client, {rids[n]: now + 5_000 for n in ("pushed", "later", "settled", "kept")},
                                      [rids["held"]], now_ms=now, lease_ms=lease)
        finally:
            await client.aclose()

    asyncio.run(push())
    score = {name: r.zscore(keys.callbacks_due(bucket), rid) for name, rid in rids.items()}
    ttl = {name: r.pttl(keys.request(rid)) for name, rid in rids.items()}
    assert score == {"pushed": now + 5_000, "held": now - 100, "later": now + 60_000, "settled": None,
                     "kept": now + 5_000}
    assert 5_000 + lease - 2_000 < ttl["pushed"] <= 5_000 + lease
    assert lease - 2_000 < ttl["held"] <= lease
    assert 60_000 + lease - 2_000 < ttl["later"] <= 60_000 + lease
    assert 0 < ttl["settled"] <= 1_000 and ttl["kept"] == -1



def ended(stack: Stack, urls: list[str], name: str) -> list[str]:
    """A request a session for each callback URL, all ended."""
    rids = [submit(stack.base_url, f"{name}-{i}", max_tokens=2, callback_url=f"{url}/{i}")
            for i, url in enumerate(urls)]
    for rid in rids:
        wait_for(lambda rid=rid: status(stack, rid)["status"] == "done", what="the request's end")
    return rids


def test_callbacks_due_while_every_place_is_taken_keep_their_requests(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two receivers that answer in 3 s take every place of the process (CONCURRENCY 2 here, 1 a host);
    callbacks to a fast receiver that come due meanwhile wait those 3 s against a 2-s session TTL. The passes
    of the full process read them and keep their requests. (Before, a full pass read nothing: dropped, 404.)"""
    monkeypatch.setattr(delivery_module, "PER_HOST", 1)
    monkeypatch.setattr(delivery_module, "CONCURRENCY", 2)
    slow = [BlackHole(host, answer_after=3.0) for host in ("127.0.0.2", "127.0.0.3")]
    fast = BlackHole("127.0.0.4", answer_after=0.05)
    stack = start_stack(redis_url, delivery=False, session_ttl=2, webhook_timeout=4.0,
                        webhook_allow="127.0.0.2,127.0.0.3,127.0.0.4")
    try:
        stack.start_service("webhooks", Delivery(stack.settings, poll_seconds=0.05).run)
        first = ended(stack, [receiver.url for receiver in slow], "first")
        wait_for(lambda: all(receiver.open == 1 for receiver in slow), what="every place taken")
        late = ended(stack, [fast.url] * 2, "late")
        all_delivered(stack, first + late, timeout=30)
        assert fast.accepted == 2
    finally:
        for receiver in [*slow, fast]:
            receiver.stop()
        stack.stop()


def test_callbacks_a_pass_leaves_at_the_bound_keep_their_requests(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six callbacks due to a receiver that answers in 1.5 s, with the process's only two places (CONCURRENCY =
    PER_HOST = 2 here) and a poll longer than the 2-s session TTL: only the passes that come as places free
    read them, and each stops at the bound. The rest it read keeps its requests: the last two wait about 3 s.
    (Before, such a pass just stopped there: they were dropped, 404.)"""
    monkeypatch.setattr(delivery_module, "PER_HOST", 2)
    monkeypatch.setattr(delivery_module, "CONCURRENCY", 2)
    receiver = BlackHole(answer_after=1.5)
    stack = start_stack(redis_url, delivery=False, session_ttl=2, webhook_timeout=3.0)
    try:
        rids = ended_requests(stack, receiver.url, 6)
        stack.start_service("webhooks", Delivery(stack.settings, poll_seconds=5.0).run)
        all_delivered(stack, rids, timeout=30)
        assert receiver.accepted == 6 and receiver.most_open <= 2
    finally:
        receiver.stop()
        stack.stop()
