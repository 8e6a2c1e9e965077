"""/metrics tenant labels are sticky and fleet-wide: the first --metrics-max-tenants tenants seen keep
their label, the rest share tenant="~other" (a label no tenant can have). A tenant that overtakes a
labelled one never takes its label: re-ranking moved the loser's whole history into the overflow
series, a counter jump with no traffic behind it (and a tenant called "other" was merged with it)."""

from __future__ import annotations

import asyncio

import redis

from sluicegate.api.metrics import OTHER, render_metrics
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from sluicegate.sessions.metrics_store import CLOSED, LABELLED_TENANTS
from tests.helpers import ON_CLUSTER, Stack, fast_settings, submit
from tests.metrics_helpers import Sample, scrape, series, wait_done

COUNTERS = ("sluicegate_tokens_total", "sluicegate_requests_total")


def counters(samples: dict[Sample, float]) -> dict[Sample, float]:
    return {k: v for k, v in samples.items() if k[0] in COUNTERS}


def tokens(samples: dict[Sample, float]) -> dict[tuple[str, str], float]:
    """sluicegate_tokens_total as {(priority, tenant): value}."""
    return {(dict(k)["priority"], dict(k)["tenant"]): v for k, v in series(samples, "sluicegate_tokens_total").items()}


def test_a_tenant_that_overtakes_a_labelled_one_moves_no_counter(redis_url: str) -> None:
    """The reviewer's repro: with one label, Y (seen first) keeps it after X streams past it; nothing
    streamed at priority 7 and no counter of scrape 1 changes but X's, which stays in the overflow."""
    stack = Stack(fast_settings(redis_url, metrics_max_tenants=1, sim_tokens_per_second=2000.0)).start(workers=1)
    try:
        base = stack.base_url
        wait_done(base, [submit(base, "y", tenant="Y", priority="high", max_tokens=300)])
        wait_done(base, [submit(base, "z", tenant="Z", priority="high", max_tokens=5),
                         submit(base, "x", tenant="X", priority="normal", max_tokens=250)])
        first = scrape(base)
        assert tokens(first) == {("7", "Y"): 300, ("7", OTHER): 5, ("5", OTHER): 250}
        wait_done(base, [submit(base, "x", tenant="X", priority="normal", max_tokens=100)])  # X overtakes Y
        second = scrape(base)
        assert tokens(second) == {("7", "Y"): 300, ("7", OTHER): 5, ("5", OTHER): 350}
        before, after = counters(first), counters(second)
        assert before.keys() <= after.keys(), f"series gone: {sorted(before.keys() - after.keys())}"
        moved = {k: (v, after[k]) for k, v in before.items() if after[k] != v}
        # only X's request series moved (submitted and done, +1 each): X's tokens are checked above
        assert all(dict(k[1])["tenant"] == OTHER and after[k] == v + 1 for k, (v, _) in moved.items()
                   if k[0] == "sluicegate_requests_total"), moved
        assert {dict(k[1])["tenant"] for k in after if k not in before} <= {OTHER}
    finally:
        stack.stop()


def _write_tokens(r: redis.Redis, counts: dict[str, int]) -> None:
    """Tokens as the data plane counts them (sessions/lua/includes/metrics.lua `count`), written directly."""
    for tenant, n in counts.items():
        r.hincrby(keys.data_metrics(keys.all_buckets()[0]), f"tokens|default|5|{tenant}", n)


def _tokens_by_tenant(body: bytes) -> dict[str, float]:
    prefix = 'sluicegate_tokens_total{group="default",priority="5",tenant="'
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in body.decode().splitlines() if line.startswith(prefix)}


async def _scrapes(redis_url: str, count: int, cap: int) -> list[bytes]:
    """`count` API processes' scrapes at once, each with --metrics-max-tenants `cap`."""
    clients = [async_client(redis_url, cluster=ON_CLUSTER) for _ in range(count)]
    try:
        return list(await asyncio.gather(*(render_metrics(c, open_streams=0, max_tenants=cap) for c in clients)))
    finally:
        for client in clients:
            await client.aclose()


def test_a_tenant_called_other_is_not_the_overflow_and_concurrent_scrapes_label_at_most_n(
        redis_url: str, r: redis.Redis) -> None:
    """Five API processes' first scrapes at once label exactly two tenants between them (the largest
    seen: "other" and "a"); "other" keeps a series of its own; later, larger tenants stay in ~other."""
    def scrapes(count: int) -> list[bytes]:
        return asyncio.run(_scrapes(redis_url, count, 2))

    _write_tokens(r, {"other": 40, "a": 30, "b": 20, "c": 10})
    bodies = scrapes(5)
    expected = {"other": 40, "a": 30, OTHER: 30}
    assert [_tokens_by_tenant(b) for b in bodies] == [expected] * 5
    assert r.zrange(LABELLED_TENANTS, 0, -1) == ["other", "a", CLOSED]  # b and c went to the overflow
    _write_tokens(r, {"b": 100, "d": 500})  # b and d overtake both labelled tenants
    assert [_tokens_by_tenant(b) for b in scrapes(2)] == [{"other": 40, "a": 30, OTHER: 630}] * 2


def test_a_raised_cap_takes_no_tenant_out_of_the_overflow(redis_url: str, r: redis.Redis) -> None:
    """The reviewer's repro: a scrape with cap 1 sums B and C into ~other; one with cap 3 (raised, or
    another process's) used to label them, and ~other went from 50 to 0 with no traffic. Once a tenant
    is in the overflow, no tenant gets a label any more, whatever the cap; until then a raised cap labels
    new tenants as they come; a lowered cap keeps the earliest."""
    def scrape_with(cap: int) -> dict[str, float]:
        return _tokens_by_tenant(asyncio.run(_scrapes(redis_url, 1, cap))[0])

    _write_tokens(r, {"A": 50})
    assert scrape_with(1) == {"A": 50}  # nobody in the overflow yet: the set stays open
    _write_tokens(r, {"B": 30, "C": 20})
    assert scrape_with(1) == {"A": 50, OTHER: 50}
    assert scrape_with(3) == {"A": 50, OTHER: 50}
    _write_tokens(r, {"D": 5})  # a tenant first seen after the raise joins the overflow too
    assert scrape_with(3) == {"A": 50, OTHER: 55}
    assert scrape_with(1) == {"A": 50, OTHER: 55}

    r.delete(LABELLED_TENANTS)  # deleting the key picks again (moving series once)
    assert scrape_with(3) == {"A": 50, "B": 30, "C": 20, OTHER: 5}
    assert scrape_with(5) == {"A": 50, "B": 30, "C": 20, OTHER: 5}

    r.delete(LABELLED_TENANTS)
    r.delete(keys.data_metrics(keys.all_buckets()[0]))  # what _write_tokens wrote
    _write_tokens(r, {"A": 50})
    assert scrape_with(2) == {"A": 50}  # the set is not full: a raised cap still labels newcomers
    _write_tokens(r, {"B": 30, "C": 20})
    assert scrape_with(3) == {"A": 50, "B": 30, "C": 20}
    assert scrape_with(1) == {"A": 50, OTHER: 50}  # a lowered cap keeps the earliest
