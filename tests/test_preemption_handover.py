"""A preemption hands the victim's slot over at once: the waiting request starts on the victim's worker in the
same call. What the hand-over must not get wrong: the taker's counter when it is the victim's own tenant, the
rate quotas when an aged request sat at the top, a victim whose slot cannot pass (its ticket dropped, its
worker's backend down), and a max_concurrency cap, under which the stopped run counts until it lets go."""

from __future__ import annotations

import json

import pytest
import redis

from sluicegate.sessions import keys
from tests.sched_harness import Harness, held_tickets, tickets


def show_backend_down(h: Harness, wid: str) -> None:
    """What a worker whose backend went away registers (workers/worker.py `_withdraw`): backend "down"."""
    field = keys.group_key(h.workers[wid], "workers")
    info = json.loads(h.r.hget(field, wid))
    h.r.hset(field, wid, json.dumps({**info, "backend": "down"}))


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_tenant_that_preempts_its_own_run_is_charged_after_the_victims_refund(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=0, w_in=0, w_out=1, est=1)
    h.add_worker("w", slots=1)
    low = h.submit("a", tenant="A", priority=1, max_tokens=100)
    h.append(h.run_of(low), 2)
    h.advance(10)
    assert h.vtc("A") == 100
    high = h.submit("b", tenant="A", priority=8, max_tokens=10)
    assert h.status(low) == "preempted" and h.status(high) == "running"
    assert h.vtc("A") == 2 + 10  # the victim's 2 tokens, the high request's estimate


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_victim_holding_no_ticket_is_passed_over(r: redis.Redis) -> None:
    """A run whose ticket its worker's re-offer dropped (its assignment lost with an inbox read's reply) has no
    slot to hand over: the next victim's is taken, and the one-slot worker's ledger keeps one slot."""
    h = Harness(r)
    h.policy(min_run=0)
    h.add_worker("w", slots=1)
    lost = h.submit("a", priority=1, max_tokens=10)
    h.runs.remove(h.run_of(lost))  # the worker never got it ...
    h._offer_slots("w", 1, [])  # ... and offers its one slot again: the lost run's ticket is dropped
    other = h.submit("b", priority=3, max_tokens=2)
    assert h.status(other) == "running" and tickets(h) == 0
    h.advance(10)
    high = h.submit("h", priority=8, max_tokens=2)
    assert h.status(lost) == "running" and h.status(other) == "preempted" and h.status(high) == "running"
    assert held_tickets(h) == {f"{high}|1"} and tickets(h) == 0


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_an_aged_request_at_the_top_lets_no_request_past_the_token_quota(r: redis.Redis) -> None:
    """The dispatch gates the aged (class 10) request at the top; the class 7 request a preemption starts is
    gated too: it needs 100 tokens and the bucket holds about 95."""
    h = Harness(r)
    h.policy(min_run=0, mw2=5)
    h.add_worker("w", slots=1)
    h.quota("default", tokens_per_second=1, burst_tokens=100)
    low = h.submit("l", priority=3, max_tokens=10)
    assert h.status(low) == "running"
    h.submit("p", priority=3, max_tokens=1)  # class 3 stays the highest ready: class 2 ages
    aged = h.submit("g", priority=2, max_tokens=1)
    h.advance(5000)
    assert h.sweep()[1] == 1 and h.req(aged)["ep"] == "10"
    big = h.submit("x", priority=7, max_tokens=100)
    assert h.status(big) == "queued" and h.status(low) == "running"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_run_on_a_worker_whose_backend_is_down_is_passed_over(r: redis.Redis) -> None:
    """A request handed that run's slot would only be handed back (its worker withdrew its slots)."""
    h = Harness(r)
    h.policy(min_run=0)
    h.add_worker("w0")
    older = h.submit("a", priority=1, max_tokens=10)
    h.advance(10)
    h.add_worker("w1")
    newer = h.submit("b", priority=1, max_tokens=10)  # the natural victim
    show_backend_down(h, "w1")
    high = h.submit("h", priority=8, max_tokens=2)
    assert h.status(newer) == "running" and h.status(older) == "preempted"
    assert h.status(high) == "running" and h.run_of(high).wid == "w0"


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_fair_share_passes_over_a_run_on_a_worker_whose_backend_is_down(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=0)
    h.add_worker("w0")
    older = h.submit("f0", tenant="flood")
    h.advance(10)
    h.add_worker("w1")
    newer = h.submit("f1", tenant="flood")  # fair share's natural victim: the most recently started
    h.submit("f2", tenant="flood")  # the flooder's backlog
    show_backend_down(h, "w1")
    calm = h.submit("c", tenant="calm")
    assert h.status(newer) == "running" and h.status(older) == "preempted"
    assert h.status(calm) == "running" and h.run_of(calm).wid == "w0"
