"""Tenant fairness inside a class: weighted Virtual Token Counter (charge (w_in*in + w_out*out)/weight,
estimate at dispatch, reconcile at the end), least counter first, returning tenants lifted to the least
backlogged counter, runtime weights; FIFO over a tenant's ready sessions."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, submit, wait_for
from tests.sched_harness import Harness

WEIGHTS = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0}
PROMPT = "x" * 40  # 10 input tokens


def serve(h: Harness, tenants: dict[str, float], dispatches: int, *, backlog: int = 2, max_tokens: int = 10,
          produce: Callable[[str], int] | None = None) -> Counter[str]:
    """Keep `backlog` ready requests per tenant on one slot; returns the service (w_in*in + w_out*out)
    each tenant received over `dispatches` runs. `produce(tenant)` says how many tokens a run really
    produces (default max_tokens, the estimate)."""
    service: Counter[str] = Counter()
    n = 0
    for tenant in tenants:
        for _ in range(backlog):
            n += 1
            h.submit(f"{tenant}-{n}", tenant=tenant, max_tokens=max_tokens, prompt=PROMPT)
    if not h.workers:
        h.add_worker("w1", slots=1)  # after the backlog: every tenant starts level
    for _ in range(dispatches):
        run = h.runs[0]
        tenant = h.req(run.rid)["tn"]
        out = produce(tenant) if produce else max_tokens
        h.append(run, out)
        h.advance(1)
        n += 1
        h.submit(f"{tenant}-{n}", tenant=tenant, max_tokens=max_tokens, prompt=PROMPT)  # keep it backlogged
        h.finish(run)
        service[tenant] += 10 + 2 * out
    return service


def assert_shares(service: Counter[str], weights: dict[str, float], tolerance: float) -> None:
    total, wsum = sum(service.values()), sum(weights.values())
    for tenant, w in weights.items():
        share, want = service[tenant] / total, w / wsum
        assert abs(share - want) <= tolerance * want, (tenant, share, want, dict(service))


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_weighted_token_shares_converge(r: redis.Redis) -> None:
    h = Harness(r)
    for tenant, w in WEIGHTS.items():
        h.weight(tenant, w)
    assert_shares(serve(h, WEIGHTS, 600), WEIGHTS, 0.05)


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_shares_hold_when_estimates_are_wrong(r: redis.Redis) -> None:
    """Every run is charged max_tokens at dispatch, but tenants really produce 100%, 75%, 50% and 25% of it
    (+-10%): only the reconciliation at the end keeps the token shares right; without it each tenant would
    get its weight share of *requests*, and a (whose estimates are right) about twice its token share."""
    h = Harness(r)
    for tenant, w in WEIGHTS.items():
        h.weight(tenant, w)
    rng = random.Random(5)
    ratio = {"a": 1.0, "b": 0.75, "c": 0.5, "d": 0.25}
    service = serve(h, WEIGHTS, 400, max_tokens=40,
                    produce=lambda t: max(1, min(40, round(40 * ratio[t] * rng.uniform(0.9, 1.1)))))
    assert_shares(service, WEIGHTS, 0.10)
    # The VTC bound: normalised service of backlogged tenants differs by at most one request's cost.
    normalised = [service[t] / w for t, w in WEIGHTS.items()]
    assert max(normalised) - min(normalised) <= 10 + 2 * 40


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_counter_reconciled_at_finish(r: redis.Redis) -> None:
    h = Harness(r)
    h.weight("t", 2)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", tenant="t", max_tokens=100, prompt=PROMPT)
    assert h.vtc("t") == (10 + 2 * 100) / 2  # charged with the estimate at dispatch
    h.append(h.run_of(rid), 30)
    h.finish(h.run_of(rid))
    assert h.vtc("t") == (10 + 2 * 30) / 2  # reconciled with what was produced


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_preempted_run_is_charged_once_and_not_lifted(r: redis.Redis) -> None:
    """Across a preemption the tenant pays its input once and its output once; going back to the ready set
    after a preemption is not a 'return from idle', so the counter is not lifted."""
    h = Harness(r)
    h.policy(min_run=0)
    h.weight("t", 2)
    h.add_worker("w1", slots=1)
    rid = h.submit("s", tenant="t", max_tokens=100, prompt=PROMPT)
    h.append(h.run_of(rid), 10)
    high = h.submit("h", tenant="u", priority=9, max_tokens=5, prompt=PROMPT)
    assert h.status(rid) == "preempted"
    assert h.vtc("t") == (10 + 2 * 10) / 2
    h.finish(h.run_of(rid))
    h.complete(high)
    assert h.vtc("t") == (10 + 2 * 10 + 2 * 90) / 2  # the resumed run: estimate of the rest, no input
    h.append(h.run_of(rid), 20)
    h.finish(h.run_of(rid))
    assert h.vtc("t") == (10 + 2 * 30) / 2


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_returning_tenant_is_lifted_to_least_backlogged_counter(r: redis.Redis) -> None:
    h = Harness(r)
    h.add_worker("w1", slots=1)
    for i in range(12):
        h.submit(f"a{i}", tenant="a", prompt=PROMPT)
    for _ in range(5):
        h.complete(h.runs[0].rid)
    least_backlogged = h.vtc("a")
    assert least_backlogged == 6 * 30  # five served, the sixth running
    h.submit("b0", tenant="b", prompt=PROMPT)
    assert h.vtc("b") == least_backlogged  # no credit banked while idle
    for i in range(1, 6):
        h.submit(f"b{i}", tenant="b", prompt=PROMPT)
    before = len(h.dispatched)
    for _ in range(8):
        h.complete(h.runs[0].rid)
    order = [r.hget(keys.request(run.rid), "tn") for run in h.dispatched[before:]]
    assert Counter(order) == Counter({"a": 4, "b": 4})  # alternating, not a burst of b


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_lift_never_lowers_a_counter_and_uses_the_last_counter_when_nobody_waits(r: redis.Redis) -> None:
    h = Harness(r)
    h.add_worker("w1", slots=1)
    r.hset(keys.group_key("default", "vtc"), "rich", 1000)
    h.submit("a", tenant="a", prompt=PROMPT)  # runs at once: nobody backlogged behind it
    last = h.vtc("a")
    h.submit("b", tenant="b", prompt=PROMPT)  # the queue is empty: lifted to the last dispatched counter
    assert h.vtc("b") == last == 30
    h.submit("rich", tenant="rich", prompt=PROMPT)
    assert h.vtc("rich") == 1000


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_weight_change_applies_to_next_decisions(r: redis.Redis) -> None:
    h = Harness(r)
    first = serve(h, {"a": 1, "b": 1}, 20)
    assert first["a"] == first["b"]
    h.weight("b", 3)
    second = serve(h, {"a": 1, "b": 1}, 40, backlog=0)
    assert_shares(second, {"a": 1, "b": 3}, 0.1)


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_fifo_over_a_tenants_ready_sessions(r: redis.Redis) -> None:
    h = Harness(r)
    s0 = [h.submit("s0", tenant="t"), h.submit("s0", tenant="t")]
    rest = []
    for i in range(1, 6):
        h.advance(1)
        rest.append(h.submit(f"s{i}", tenant="t"))
    h.add_worker("w1", slots=1)
    for _ in range(7):
        h.advance(1)
        h.complete(h.runs[0].rid)
    # s0's second request became ready only when its first finished: it goes behind s1..s5.
    assert h.dispatched_rids() == [s0[0], *rest, s0[1]]


def test_a_weight_set_while_a_group_copies_the_weights_is_not_undone(redis_url: str) -> None:
    """A scheduler starting copies sg:tenants into each group (copy_policy) while an operator sets a
    weight: the copy read the old weights, the PUT wrote the new one (source, then copies), and the
    copy's write put the old one back where decisions read it, until the next restart."""
    from sluicegate.scheduler.admin import Tuning
    from sluicegate.sessions.connect import async_client
    from sluicegate.sessions.registry import copy_policy, register_group

    class PutDuringTheCopy:
        """The store, with the operator's PUT landing right after the copy's first read of the weights."""

        def __init__(self, store: Any) -> None:
            self.store, self.put = store, False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

        async def hgetall(self, key: str) -> Any:
            value = await self.store.hgetall(key)
            if key == keys.TENANT_WEIGHTS and not self.put:
                self.put = True
                await Tuning(self.store).set_weight("acme", 4.0)
            return value

    async def scenario() -> tuple[str | None, str | None]:
        store = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            await Tuning(store).set_weight("acme", 1.0)
            await register_group(store, "g1")
            await copy_policy(PutDuringTheCopy(store), "g1")
            return (await store.hget(keys.TENANT_WEIGHTS, "acme"), await store.hget(keys.group_key("g1", "tw"), "acme"))
        finally:
            await store.aclose()

    assert asyncio.run(scenario()) == ("4.0", "4.0")


def test_weights_through_the_api_steer_dispatch(redis_url: str) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0)
    try:
        base = stack.base_url
        code, body = call("PUT", f"{base}/v1/admin/tenants/b", {"weight": 4})
        assert code == 200 and body["weight"] == 4
        code, body = call("PUT", f"{base}/v1/admin/tenants/b", {"weight": -1})
        assert 400 <= code < 500
        code, tenants = call("GET", f"{base}/v1/admin/tenants")
        assert code == 200 and {t["tenant"]: t["weight"] for t in tenants["tenants"]} == {"b": 4.0}
        rids = {}
        for i in range(10):
            for tenant in ("a", "b"):
                rids[submit(base, f"{tenant}{i}", tenant=tenant, max_tokens=4)] = tenant
        stack.add_worker(slots=1)

        def views() -> list[dict] | None:
            got = [call("GET", f"{base}/v1/requests/{rid}")[1] for rid in rids]
            return got if all(v["status"] == "done" for v in got) else None

        done = sorted(wait_for(views, timeout=30, what="all done"), key=lambda v: v["started_at"])
        first_ten = Counter(v["tenant"] for v in done[:10])
        assert first_ten["b"] >= 7, first_ten
    finally:
        stack.stop()


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_counter_raised_in_another_class_still_decides_within_this_one(r: redis.Redis) -> None:
    """A dispatch raises its tenant's counter without rewriting the tenant's score in its other classes;
    the decision must still go by the counter. a runs in class 7 (counter 0 -> 30) while a and b both
    wait in class 5 with scores 0 there: b (counter 0) goes first, not a (score 0, counter 30)."""
    h = Harness(r)
    a7 = h.submit("a7", tenant="a", priority=7, max_tokens=10, prompt=PROMPT)
    a5 = h.submit("a5", tenant="a", priority=5, max_tokens=10, prompt=PROMPT)
    b5 = h.submit("b5", tenant="b", priority=5, max_tokens=10, prompt=PROMPT)
    h.add_worker("w1", slots=1)
    assert h.dispatched_rids() == [a7] and h.vtc("a") == 30 and h.vtc("b") == 0
    assert r.zscore(keys.group_key("default", "c5"), "a") == 0  # lagging behind a's counter
    h.complete(a7)  # produced exactly its estimate: nothing to reconcile, the score still lags
    assert h.dispatched_rids() == [a7, b5]
    assert r.zscore(keys.group_key("default", "c5"), "a") == 30  # caught up when it came to the head
    h.complete(b5)
    assert h.dispatched_rids() == [a7, b5, a5]
