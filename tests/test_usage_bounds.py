"""Usage counts the store can always add, and usage reads that miss nothing.

A backend's count of 2^63 or more (`"prompt_tokens": 1e20`) reached HINCRBY in the request's end
(sessions/lua/includes/ended.lua), after the end's first writes: the request was left done without its
`done` event, its session's next request queued for ever. A backend's usage is now believed only with
whole counts in [0, 2^53) (the worker's usage_as_uninterrupted, and the store's usage_of), else
Sluicegate's counts are used; and a count the hourly hash cannot take is skipped by the fold
(usage_apply.lua) rather than failing it, and every usage read with it, for ever.
A read folds first, but a fold left half-way was finished without taking what ended since; and a read
chose its hours by the API host's clock while the store stamps them."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys, usage
from sluicegate.sessions.connect import async_client
from sluicegate.workers.engines.openai import usage_as_uninterrupted
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness


def read_usage(redis_url: str, **kwargs: Any) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        rc = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            return await usage.usage(rc, **kwargs)
        finally:
            await rc.aclose()

    return asyncio.run(read())


@pytest.mark.parametrize("cluster", [False, True], ids=["one_call", "per_plane"])
@pytest.mark.parametrize("reported", [{"prompt_tokens": 10**20, "completion_tokens": 4},
                                      {"prompt_tokens": 7, "completion_tokens": 1e20},
                                      {"prompt_tokens": 2**63, "completion_tokens": 2**64}])
def test_a_backend_count_past_what_the_store_counts_ends_the_request_with_sluicegates_counts(
        r: redis.Redis, redis_url: str, cluster: bool, reported: dict[str, Any]) -> None:
    if ON_CLUSTER and not cluster:
        pytest.skip("the one-call protocol (and its pinned clock) is a single server's")
    h = Harness(r, lease_ms=60_000, cluster=cluster)
    h.add_worker("w0", slots=1)
    first = h.submit("s", max_tokens=4, prompt="x" * 400)  # its input estimated at 100 tokens
    second = h.submit("s", max_tokens=4)
    run = h.run_of(first)
    h.append(run, 4)
    h.runs.remove(run)
    asyncio.run(h.t.finish(first, run.attempt, wid="w0", group="default", outcome="done", detail="stop",
                           return_slot=True, usage=reported))  # [ResponseError: value is not an integer]
    h.collect()
    assert h.status(first) == "done"
    done = [e for e in h.events("s", first) if e.event == "done"]
    assert len(done) == 1  # [no done event]
    estimate = int(h.req(first)["it"])
    sluicegates = {"prompt_tokens": estimate, "completion_tokens": 4, "total_tokens": estimate + 4}
    assert done[0].data["usage"] == sluicegates
    assert json.loads(h.req(first)["us"]) == sluicegates
    assert h.status(second) == "running"  # the session went on, on the slot given back [queued]
    at = float(h.req(first)["fin"]) / 1000
    rows = read_usage(redis_url, since=at, until=at, tenant="t")
    assert [(row["requests"], row["input_tokens"], row["output_tokens"]) for row in rows] == [(1, estimate, 4)]


@pytest.mark.single_server  # no Redis: once is enough
@pytest.mark.parametrize("count", [10**20, 1e20, 2**53, -1, 2.5, float("nan"), float("inf"), True, "12", None])
def test_the_worker_does_not_believe_a_count_that_is_not_a_sane_whole_number(count: Any) -> None:
    assert usage_as_uninterrupted({"prompt_tokens": count, "completion_tokens": 4}, 0) is None
    assert usage_as_uninterrupted({"prompt_tokens": 4, "completion_tokens": count}, 0) is None


@pytest.mark.single_server  # no Redis: once is enough
def test_the_worker_believes_whole_counts_below_2_to_the_53() -> None:
    usage_ = usage_as_uninterrupted({"prompt_tokens": 2**53 - 1, "completion_tokens": 12.0}, 0)
    assert usage_ is not None and (usage_["prompt_tokens"], usage_["completion_tokens"]) == (2**53 - 1, 12)


def test_a_count_the_hour_cannot_take_is_skipped_and_the_rest_folded(redis_url: str) -> None:
    """Counts already pending that the hourly hash cannot add (not a 64-bit integer, or a total past
    2^63) must not fail the fold, which would be taken again with them for ever, nor the usage read."""
    hour = int(time.time()) // 3600 * 3600

    async def scenario() -> list[dict[str, Any]]:
        rc = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            bucket = keys.bucket_of_session("huge")
            await rc.hset(keys.usage_hour(hour), "acme|default|o", str(2**63 - 10))
            await rc.hset(keys.usage_pending(bucket), mapping={
                f"{hour}|acme|default|r": 3, f"{hour}|acme|default|i": "100000000000000000000",
                f"{hour}|acme|default|o": 20})
            rows = await usage.usage(rc, since=hour, tenant="acme")  # [ResponseError: not an integer or out of range]
            assert not await rc.exists(keys.usage_folding(bucket))
            return rows
        finally:
            await rc.aclose()

    rows = asyncio.run(scenario())
    assert [(row["requests"], row["input_tokens"], row["output_tokens"]) for row in rows] == [(3, 0, 2**63 - 10)]


def test_a_read_after_a_fold_left_half_way_includes_what_ended_since(redis_url: str) -> None:
    hour = int(time.time()) // 3600 * 3600

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rc = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            bucket = keys.bucket_of_session("halfway")
            await rc.hincrby(keys.usage_pending(bucket), f"{hour}|acme|default|r", 1)
            assert await usage.take(rc, bucket)  # a folder takes, then dies
            await rc.hincrby(keys.usage_pending(bucket), f"{hour}|acme|default|r", 1)  # a request ends after
            rows = await usage.usage(rc, since=hour, tenant="acme")
            assert not await rc.exists(keys.usage_pending(bucket), keys.usage_folding(bucket))
            return rows, await usage.usage(rc, since=hour, tenant="acme")
        finally:
            await rc.aclose()

    rows, again = asyncio.run(scenario())
    assert [row["requests"] for row in rows] == [2]  # [1: the second waited for the next fold]
    assert again == rows


def test_a_read_includes_the_hour_a_store_running_ahead_stamped(redis_url: str) -> None:
    """The store stamps a count's hour by its own clock (ended.lua), the read picks hours by the API
    host's: a store a few seconds ahead puts the first seconds of its new hour where the read must look.
    Written as that store's end leaves it (its pending hash), which also runs on the cluster, where the
    store's clock cannot be pinned."""
    next_hour = (int(time.time()) // 3600 + 1) * 3600

    async def scenario() -> list[dict[str, Any]]:
        rc = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            await rc.hincrby(keys.usage_pending(keys.bucket_of_session("ahead")), f"{next_hour}|acme|default|r", 1)
            return await usage.usage(rc, since=time.time() - 60, tenant="acme")
        finally:
            await rc.aclose()

    rows = asyncio.run(scenario())
    assert [(row["hour"], row["requests"]) for row in rows] == [(next_hour, 1)]  # [[]: that hour not read]


def test_a_read_with_an_end_reads_no_hour_past_it(redis_url: str) -> None:
    """The hour after now's is read only when no `until` is given: an end asked for is the end."""
    next_hour = (int(time.time()) // 3600 + 1) * 3600

    async def scenario() -> list[dict[str, Any]]:
        rc = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            await rc.hincrby(keys.usage_pending(keys.bucket_of_session("ended")), f"{next_hour}|zeta|default|r", 1)
            return await usage.usage(rc, since=time.time() - 60, until=time.time(), tenant="zeta")
        finally:
            await rc.aclose()

    assert asyncio.run(scenario()) == []


@pytest.mark.single_server  # the store's clock pinned (sg:clock) to know the hour the end counts in
def test_an_end_whose_pending_total_would_pass_2_to_the_63_still_ends(r: redis.Redis) -> None:
    h = Harness(r, lease_ms=60_000)
    h.add_worker("w0", slots=1)
    first = h.submit("s", max_tokens=4)
    second = h.submit("s", max_tokens=4)
    hour = h.now // 3_600_000 * 3600
    r.hset(keys.usage_pending(keys.bucket_of_request(first)), f"{hour}|t|default|o", str(2**63 - 10))
    run = h.run_of(first)
    h.append(run, 4)
    h.runs.remove(run)
    asyncio.run(h.t.finish(first, run.attempt, wid="w0", group="default", outcome="done", detail="stop",
                           return_slot=True, usage={"prompt_tokens": 5, "completion_tokens": 2**53 - 1}))
    h.collect()
    assert [e.event for e in h.events("s", first)][-1] == "done"
    assert h.status(second) == "running"
