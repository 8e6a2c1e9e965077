"""The metrics the functions keep (sessions/metrics_store.py): every bucket's and group's share summed,
read a chunk of hashes a round trip, and with `only` the named metrics alone."""

from __future__ import annotations

import asyncio

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from sluicegate.sessions.metrics_store import METRICS_CHUNK, read_metrics
from tests.helpers import ON_CLUSTER
from tests.sched_harness import T0, Harness


def test_the_shares_of_every_bucket_and_group_are_summed_and_only_picks_names(redis_url: str, r: redis.Redis) -> None:
    buckets = keys.all_buckets()
    assert len(buckets) > 4 * METRICS_CHUNK  # the sum crosses chunks
    for i, bucket in enumerate(buckets):
        r.hset(keys.data_metrics(bucket), mapping={"depth|g1|5|t1": 1, "tokens|g1|5|t1": i, "ttft|g1|5|3": 2})
    r.hset(keys.group_metrics("g1"), mapping={"depth|g1|5|t1": -len(buckets) + 7, "starts|g1|5": 4})

    round_trips = []

    async def read(only: tuple[str, ...] | None) -> dict[str, dict[str, float]]:
        client = async_client(redis_url, cluster=ON_CLUSTER)
        pipeline = client.pipeline
        client.pipeline = lambda **kw: round_trips.append(kw) or pipeline(**kw)  # type: ignore[method-assign]
        try:
            return await read_metrics(client, ["g1"], only=only)
        finally:
            await client.aclose()

    everything = asyncio.run(read(None))
    assert len(round_trips) == -(-(len(buckets) + 1) // METRICS_CHUNK)  # a chunk of hashes a round trip
    assert everything == {"depth": {"g1|5|t1": 7.0}, "tokens": {"g1|5|t1": float(sum(range(len(buckets))))},
                          "ttft": {"g1|5|3": 2.0 * len(buckets)}, "starts": {"g1|5": 4.0}}
    assert asyncio.run(read(("depth",))) == {"depth": {"g1|5|t1": 7.0}}
    assert asyncio.run(read(("tokens", "starts"))) == {"tokens": everything["tokens"], "starts": {"g1|5": 4.0}}


def test_only_walks_a_hash_too_large_for_one_scan_step(redis_url: str, r: redis.Redis) -> None:
    # A group's hash with thousands of fields is a hashtable, which HSCAN walks in steps: every
    # matching field is summed once, none missed and none twice.
    many = {f"depth|g1|5|t{i}": 1 for i in range(3000)} | {f"ttft|g1|5|{i}": 2 for i in range(3000)}
    r.hset(keys.group_metrics("g1"), mapping=many)
    assert r.object("encoding", keys.group_metrics("g1")) in ("hashtable", b"hashtable")

    async def read() -> dict[str, dict[str, float]]:
        client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            return await read_metrics(client, ["g1"], only=("depth",))
        finally:
            await client.aclose()

    assert asyncio.run(read()) == {"depth": {f"g1|5|t{i}": 1.0 for i in range(3000)}}


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_dispatch_timed_before_its_submit_observes_no_negative_wait(r: redis.Redis) -> None:
    """On a cluster a request's submit is timed by its data master and its dispatch by its group's master:
    a skew between them must not make a wait negative (the histogram's _sum would go down, which Prometheus
    reads as a counter reset). Here the pinned clock goes back 1 s between the two."""
    h = Harness(r)
    h.submit("early", max_tokens=2)
    h.set_clock(T0 - 1000)
    h.add_worker("w", slots=1)
    assert len(h.dispatched) == 1
    shares = r.hgetall(keys.group_metrics("default"))
    assert shares["wait|default|5|1"] == "1"  # observed, in the first bucket
    assert float(shares.get("wait|default|5|sum", 0)) >= 0
