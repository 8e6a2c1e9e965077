"""Fair-share preemption inside a class: with no free slot, the tenant next in the fair order takes a slot
from the tenant furthest above its weighted share of the running slots, at once (the slot is handed over),
when that tenant would still hold at least as much per weight after the swap. The victim is its most
recently started run past the min-run quantum; it resumes at its next index. Never across classes, never
a tenant at its share, never a ping-pong; bounded by --max-preemptions; off with --no-fair-share-preemption."""

from __future__ import annotations

import urllib.request

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import run_sync
from tests.helpers import Stack, call, fast_settings, sse, submit, wait_for
from tests.sched_harness import Harness, held_tickets, tickets


def flooded(h: Harness, runs: int, *, slots: int | None = None, gap: int = 10, cls: int = 5) -> list[str]:
    """One worker whose every slot runs a request of tenant `flood`, started `gap` ms apart."""
    h.add_worker("w0", slots=slots or runs)
    rids = []
    for i in range(runs):
        rids.append(h.submit(f"f{i}", tenant="flood", priority=cls, max_tokens=10))
        h.append(h.run_of(rids[-1]), 2)
        h.advance(gap)
    assert len(h.running()) == runs
    return rids


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_tenant_below_its_share_takes_the_flooders_newest_slot_at_once(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=50)
    floods = flooded(h, 4)
    h.advance(1000)
    pubsub = r.pubsub()
    pubsub.ssubscribe(keys.worker_control("default", "w0"))
    assert pubsub.get_sharded_message(timeout=1)["type"] == "ssubscribe"

    mine = h.submit("m", tenant="calm", max_tokens=3)
    victim = floods[-1]  # the most recently started
    assert h.status(mine) == "running" and h.status(victim) == "preempted"
    assert h.run_of(mine).wid == "w0" and h.pending_preemptions() == 0  # handed over, not freed later
    assert pubsub.get_sharded_message(timeout=1)["data"] == f"{victim}|1|fair_share"
    last = h.events("f3", victim)[-1]
    assert (last.event, last.data["index"], last.data["reason"]) == ("preempted", 2, "fair_share")
    assert h.req(victim)["pc"] == "1"
    # the slot ledger: the victim's attempt holds no ticket any more, the taker's does; none is free
    assert held_tickets(h) == {f"{x}|1" for x in floods[:3] + [mine]} and tickets(h) == 0

    victim_run = h.run_of(victim)
    assert h.append(victim_run, 1) == [0, "preempted"]  # fenced at its next token
    h.finish(victim_run)  # lets go: no ticket comes back (the slot is the taker's)
    assert tickets(h) == 0 and h.status(victim) == "preempted"
    h.complete(mine)  # the taker's end frees the slot: the victim resumes there at its next index
    resumed = h.run_of(victim)
    assert (resumed.attempt, resumed.next_index) == ("2", 2)
    h.complete(victim)
    assert h.token_indices("f3", victim) == list(range(10))
    for rid in floods[:3]:
        h.complete(rid)
    assert tickets(h) == 4 and not held_tickets(h)
    assert not r.exists(keys.group_key("default", "ro")) and not r.keys("sg:{g:default}:rt:*")
    pubsub.close()


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_worker_that_re_offers_its_slots_counts_a_handed_over_run_as_free(r: redis.Redis) -> None:
    """A worker that lapsed and rejoins offers its slots minus the runs it holds; a run whose slot was handed
    over (not yet stopped on its side) holds none: counted, the worker's slot would be lost for good."""
    h = Harness(r)
    h.policy(min_run=0)
    floods = flooded(h, 2)
    h.advance(100)
    mine = h.submit("m", tenant="calm", max_tokens=2)
    victim_run = h.run_of(floods[1])
    assert h.status(floods[1]) == "preempted"
    h.complete(mine)  # its slot goes to the preempted flood request (attempt 2)
    h.complete(floods[0])  # a ticket comes back: nothing waits
    assert tickets(h) == 1
    r.delete(keys.worker("default", "w0"))  # the worker lapsed: its next heartbeat rejoins
    h.heartbeat("w0")  # it holds the old attempt (not yet stopped) and the new one
    assert tickets(h) == 1  # one slot is free, whatever the worker's own count of its runs says
    h.finish(victim_run)
    h.complete(floods[1])
    assert tickets(h) == 2


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_no_swap_that_would_leave_the_taker_above_the_victim(r: redis.Redis) -> None:
    """Equal weights: z holds 3 of 4 slots, b 1; b's next takes one (z: 2 after, b: 2); b's third does not.
    (z sorts after b: at 2 runs each, z is the one furthest above its share, and still not taken from.)"""
    h = Harness(r)
    h.policy(min_run=0)
    h.add_worker("w0", slots=4)
    z = [h.submit(f"z{i}", tenant="z") for i in range(3)]
    b = [h.submit("b0", tenant="b")]
    h.advance(100)
    b.append(h.submit("b1", tenant="b"))
    assert h.status(b[1]) == "running" and sum(h.status(x) == "preempted" for x in z) == 1
    b.append(h.submit("b2", tenant="b"))
    h.sweep()
    assert h.status(b[2]) == "queued" and sum(h.status(x) == "preempted" for x in z) == 1
    assert r.zrevrange(keys.group_key("default", "ro"), 0, 0) == ["z"]
    # nor does z's waiting request take b's slot back
    h.sweep()
    assert sorted(h.status(x) for x in b) == ["queued", "running", "running"]


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_weights_set_the_share(r: redis.Redis) -> None:
    """Weight 3 against 1: holding 3 of 4 slots is its share; the light tenant takes no more. (whale sorts
    after light: at 3/3 and 1/1 runs per weight it is the one taken from, and (3 - 1) / 3 < (1 + 1) / 1.)"""
    h = Harness(r)
    h.policy(min_run=0)
    h.weight("whale", 3)
    h.add_worker("w0", slots=4)
    whale = [h.submit(f"h{i}", tenant="whale") for i in range(4)]
    h.advance(100)
    light = h.submit("l0", tenant="light")
    assert h.status(light) == "running" and sum(h.status(x) == "preempted" for x in whale) == 1
    light2 = h.submit("l1", tenant="light")
    h.sweep()
    assert h.status(light2) == "queued" and sum(h.status(x) == "preempted" for x in whale) == 1
    assert r.zrevrange(keys.group_key("default", "ro"), 0, 0) == ["whale"]


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_two_flooders_do_not_keep_a_calm_tenant_waiting(r: redis.Redis) -> None:
    """a and z flood (3 runs each of 6 slots, more waiting); a comes first in the fair order, but it is no
    taker (it is above its share itself): the calm tenant behind it takes the slot."""
    h = Harness(r)
    h.policy(min_run=0)
    h.add_worker("w0", slots=6)
    runs = [h.submit(f"{t}{i}", tenant=t) for i in range(3) for t in ("a", "z")]
    waiting = [h.submit(f"{t}-wait", tenant=t) for t in ("a", "z")]
    h.advance(100)
    mine = h.submit("m", tenant="m")
    assert h.status(mine) == "running"
    assert sum(h.status(x) == "preempted" for x in runs) == 1
    assert all(h.status(x) == "queued" for x in waiting)


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_an_assignment_waiting_without_a_ticket_takes_no_slot_from_the_offer(r: redis.Redis) -> None:
    """A worker re-offers its slots while its inbox still holds two assignments: one holds a ticket, the
    other (a run handed over before the worker took it) does not. Only the first is counted out."""
    h = Harness(r)
    h.add_worker("w0", slots=2)
    inbox = keys.worker_inbox("default", "w0")
    r.lpush(inbox, "aaghost|1", "aareal|1")
    r.hset(keys.group_key("default", "tk"), "aareal|1", "w0")
    run_sync(h.t.register_worker("default", "w0", free=2, total=2))
    assert tickets(h) == 1
    # and a held run without a ticket is counted back: the worker holds 3 runs on 2 slots
    r.delete(inbox)
    r.hset(keys.group_key("default", "tk"), mapping={"aab|1": "w0", "aac|1": "w0"})
    run_sync(h.t.register_worker("default", "w0", free=2 - 3, total=2, held=["aaa|1", "aab|1", "aac|1"]))
    assert tickets(h) == 0


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_quantum_cap_class_and_switch(r: redis.Redis) -> None:
    h = Harness(r)
    h.policy(min_run=500, max_pre=1)
    floods = flooded(h, 3, gap=100)  # started at t0, t0+100, t0+200; now t0+300
    mine = h.submit("m", tenant="calm")
    # every flood run is inside its quantum: nothing taken now; the sweep is woken when the oldest ripens
    assert h.status(mine) == "queued" and all(h.status(x) == "running" for x in floods)
    wake = h.sweep()[3]
    assert wake == h.now + 200
    h.advance(200)
    h.sweep()
    assert h.status(mine) == "running" and h.status(floods[0]) == "preempted"  # the only ripe one
    # a request that used up its preemptions is immune
    h.set_preemptions(floods[1], 1)
    h.advance(1000)
    other = h.submit("o", tenant="other")
    assert h.status(other) == "running" and h.status(floods[2]) == "preempted"
    assert h.status(floods[1]) == "running"

    # never across classes: a class 5 tenant takes nothing from class 7 runs
    r.flushall()
    h = Harness(r)
    h.policy(min_run=0)
    highs = flooded(h, 3, cls=7)
    h.advance(100)
    low = h.submit("m", tenant="calm", priority=5)
    h.sweep()
    assert h.status(low) == "queued" and all(h.status(x) == "running" for x in highs)

    # switched off
    r.flushall()
    h = Harness(r)
    h.policy(min_run=0, fsp=0)
    floods = flooded(h, 3)
    h.advance(100)
    mine = h.submit("m", tenant="calm")
    h.sweep()
    assert h.status(mine) == "queued" and all(h.status(x) == "running" for x in floods)


def test_fair_share_preemption_end_to_end(redis_url: str) -> None:
    """Real workers (one server, and the cluster pass): a flooder fills every slot with long runs; another
    tenant's request starts at once, and the flooder's victim resumes later with every index once."""
    stack = Stack(fast_settings(redis_url, slots=3, sim_tokens_per_second=50.0)).start(workers=1)
    try:
        base = stack.base_url
        floods = [submit(base, f"flood-{i}", max_tokens=60, tenant="flood") for i in range(3)]
        wait_for(lambda: call("GET", f"{base}/v1/admin/stats")[1]["running"] == 3, what="flood running")
        mine = submit(base, "calm-1", max_tokens=5, tenant="calm")
        assert [e.event for e in sse(base, f"/v1/requests/{mine}/events")][-1] == "done"
        assert call("GET", f"{base}/v1/requests/{mine}")[1]["status"] == "done"
        reasons = []
        for rid in floods:
            events = list(sse(base, f"/v1/requests/{rid}/events"))
            assert events[-1].event == "done"
            assert [e.data["index"] for e in events if e.event == "token"] == list(range(60))
            reasons += [e.data["reason"] for e in events if e.event == "preempted"]
        assert reasons == ["fair_share"]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            assert 'reason="fair_share"' in response.read().decode()
        wait_for(lambda: call("GET", f"{base}/v1/admin/stats")[1]["running"] == 0, what="idle")
    finally:
        stack.stop()


# Headroom (--fair-share-headroom, policy fsr): while a running tenant is a slot or more below a tenant it
# could take a slot from by fair share (dispatch.lua `headroom`: the first four over their share running in the
# lowest class, else the heaviest overall), the group's last fsr x slots go only to tenants that could take a slot
# from that one; so a calm tenant starts in one at once instead of by a preemption.

def headroom_group(r: redis.Redis, fsr: float, *, slots: int = 8, calm_first: bool = True,
                   quota: bool = False) -> Harness:
    """One worker of `slots` slots, headroom `fsr`; tenant calm runs one request unless not `calm_first`;
    `quota`: a rate quota that never binds, so that the decision takes its other path (quota first)."""
    r.flushall()
    h = Harness(r)
    h.policy(min_run=0, fsr=fsr)
    h.add_worker("w0", slots=slots)
    if quota:
        h.quota("default", requests_per_second=10_000, burst=10_000)
    if calm_first:
        h.submit("c0", tenant="calm")
    return h


def running(h: Harness, rids: list[str]) -> int:
    return [h.status(x) for x in rids].count("running")


def never_preempted(h: Harness, rids: list[str]) -> bool:
    return all(int(h.req(x).get("pc", "0")) == 0 and int(h.req(x)["a"]) <= 1 for x in rids)


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
@pytest.mark.parametrize("quota", [False, True], ids=["slot-first", "quota-first"])
def test_the_heaviest_tenant_leaves_the_headroom_free_and_a_calm_tenant_starts_there_without_a_preemption(
        r: redis.Redis, quota: bool) -> None:
    """Headroom 0.25 of 8 slots: 2 stay free of the flooder while the calm tenant runs below it. The calm
    tenant's next requests start there with no preemption; a slot that frees refills the headroom first,
    then goes to the flooder's backlog; alone with work, the flooder fills every slot."""
    h = headroom_group(r, 0.25, quota=quota)
    calm = [h.dispatched_rids()[0]]
    floods = [h.submit(f"f{i}", tenant="flood") for i in range(10)]
    assert running(h, floods) == 5 and tickets(h) == 2  # 1 + 5 run, 2 free
    calm.append(h.submit("c1", tenant="calm"))
    assert h.status(calm[1]) == "running" and tickets(h) == 1 and never_preempted(h, floods)
    calm.append(h.submit("c2", tenant="calm"))  # the last free slot: still the calm tenant's
    assert h.status(calm[2]) == "running" and tickets(h) == 0 and never_preempted(h, floods)
    h.complete(calm[0])  # the freed slot refills the headroom: the flooder's backlog waits
    assert tickets(h) == 1 and running(h, floods) == 5
    h.complete(calm[1])
    assert tickets(h) == 2 and running(h, floods) == 5
    h.complete(floods[0])  # a slot above the headroom: the flooder's next takes it
    assert tickets(h) == 2 and running(h, floods) == 5 and h.status(floods[5]) == "running"
    h.complete(calm[2])  # the flooder is alone with work now: it fills every slot
    assert tickets(h) == 0 and running(h, floods) == 8
    for rid in floods:
        if h.status(rid) != "done":
            h.complete(rid)
    assert tickets(h) == 8 and not held_tickets(h) and never_preempted(h, floods)


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_a_second_flooder_does_not_eat_the_headroom(r: redis.Redis) -> None:
    """Headroom 1 of 8 slots; a and b both flood (3 runs each, calm 1). Whichever is first in ro, the other
    could not take a slot from it (3 + 1 > 3 - 1): neither takes the last slot while the calm tenant is
    below them, and the calm tenant's next request starts there with no preemption."""
    h = headroom_group(r, 0.125)
    floods = [h.submit(f"{t}{i}", tenant=t) for i in range(5) for t in ("a", "b")]
    assert running(h, floods) == 6 and tickets(h) == 1
    mine = h.submit("c1", tenant="calm")
    assert h.status(mine) == "running" and tickets(h) == 0 and never_preempted(h, floods)


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_the_headroom_never_idles_a_slot_for_a_tenant_alone_a_higher_class_or_when_off(r: redis.Redis) -> None:
    h = headroom_group(r, 0.25, calm_first=False)
    floods = [h.submit(f"f{i}", tenant="flood") for i in range(10)]
    assert running(h, floods) == 8 and tickets(h) == 0  # alone: every slot

    # tenants at their shares: nobody is below the heaviest, every slot is used
    h = headroom_group(r, 0.25, calm_first=False)
    even = [h.submit(f"{t}{i}", tenant=t) for i in range(5) for t in ("a", "b")]
    assert running(h, even) == 8 and tickets(h) == 0

    # a class above a running run is never held back (it could preempt that run anyway)
    h = headroom_group(r, 0.25)
    floods = [h.submit(f"f{i}", tenant="flood") for i in range(6)]
    assert running(h, floods) == 5 and tickets(h) == 2
    urgent = h.submit("u", tenant="flood", priority=7)
    assert h.status(urgent) == "running" and tickets(h) == 1

    # off: the flooder takes every free slot, and the calm tenant's next request preempts
    h = headroom_group(r, 0)
    floods = [h.submit(f"f{i}", tenant="flood") for i in range(10)]
    assert running(h, floods) == 7 and tickets(h) == 0
    h.advance(100)
    mine = h.submit("c1", tenant="calm")
    assert h.status(mine) == "running" and [h.status(x) for x in floods].count("preempted") == 1


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
@pytest.mark.parametrize(("slots", "free"), [(49, 0), (50, 1)])
def test_the_default_headroom_starts_at_50_slots(r: redis.Redis, slots: int, free: int) -> None:
    """The default (0.02 of the slots) rounds down: no slot below 50 slots, so small groups are as before."""
    h = headroom_group(r, 0.02, slots=slots)
    floods = [h.submit(f"f{i}", tenant="flood") for i in range(60)]
    assert running(h, floods) == slots - 1 - free and tickets(h) == free


def test_the_headroom_end_to_end(redis_url: str) -> None:
    """Real workers (one server, and the cluster pass), 8 slots, headroom 0.25: with a calm tenant running,
    a flooder's backlog leaves 2 slots free, and the calm tenant's next request starts in one with no
    preemption; every request ends with each index once and no `preempted` event."""
    stack = Stack(fast_settings(redis_url, slots=8, sim_tokens_per_second=20.0, fair_share_headroom=0.25)).start(
        workers=1)
    try:
        base = stack.base_url
        first = submit(base, "calm-0", max_tokens=80, tenant="calm")
        wait_for(lambda: call("GET", f"{base}/v1/admin/stats")[1]["running"] == 1, what="calm running")
        floods = [submit(base, f"flood-{i}", max_tokens=40, tenant="flood") for i in range(8)]
        wait_for(lambda: call("GET", f"{base}/v1/admin/stats")[1]["running"] == 6, what="flood running")
        mine = submit(base, "calm-1", max_tokens=5, tenant="calm")
        assert [e.event for e in sse(base, f"/v1/requests/{mine}/events")][-1] == "done"
        for rid, tokens in [(first, 80), *((rid, 40) for rid in floods)]:
            events = list(sse(base, f"/v1/requests/{rid}/events"))
            assert events[-1].event == "done"
            assert not [e for e in events if e.event == "preempted"]
            assert [e.data["index"] for e in events if e.event == "token"] == list(range(tokens))
        wait_for(lambda: call("GET", f"{base}/v1/admin/stats")[1]["running"] == 0, what="idle")
    finally:
        stack.stop()
