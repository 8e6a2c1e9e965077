"""Fair share looks for its victim among the first few tenants furthest above their weighted share (ro),
heaviest first, passing over those with no preemptible run in the waiting class: the heaviest tenant
overall may run in another class only (an interactive tenant at class 9, or one run of a low-weight
tenant), and a flooder of the waiting class must still give up a slot to a calm tenant of that class.
The free-slot headroom (--fair-share-headroom) picks its victims by the same walk; when the lightest tenant
could take from none of them, it holds back the heaviest tenant overall if that one runs only in a higher
class and would be the lightest's victim once it started a run in the lowest.

The scripts are driven directly (tests/sched_harness.py), on one server and on a cluster (the servers'
own clock there: the min-run quantum is 0, so no decision waits on it)."""

from __future__ import annotations

import redis

from sluicegate.sessions import keys
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness, tickets


def harness(r: redis.Redis, slots: int, **policy: float) -> Harness:
    h = Harness(r, cluster=ON_CLUSTER)
    h.policy(**{"min_run": 0, "fsr": 0, **policy})
    h.add_worker("w", slots=slots)
    return h


def statuses(h: Harness, rids: list[str]) -> list[str]:
    return [h.status(x) for x in rids]


def stopped_for_fair_share(h: Harness, rid: str) -> bool:
    """The run of `rid` was stopped for fair share (one server: its `preempted` event; a cluster writes that
    event at the worker's hand-back, so there its run record, which says why it was requeued)."""
    if ON_CLUSTER:
        run = h.run_of(rid)
        record = h.r.hget(keys.group_key("default", "ri"), f"{rid}|{run.attempt}")
        return record is not None and '"rr":"fair_share"' in record.replace(" ", "")
    return h.status(rid) == "preempted" and h.req(rid).get("pc") == "1"


def flood(h: Harness) -> list[str]:
    """The flooder a's three class-5 requests, 10 ms apart (the last the most recently started)."""
    floods = []
    for i in range(3):
        floods.append(h.submit(f"a{i}", tenant="a", priority=5, max_tokens=1000))
        h.advance(10)
    return floods


def test_a_flooder_gives_up_a_slot_while_a_tenant_of_another_class_is_heavier(r: redis.Redis) -> None:
    """7 slots: x runs 4 class-9 requests (the heaviest, ro 4), the flooder a 3 class-5 ones. A calm
    tenant's class-5 request takes a's newest slot at once (a still holds 2 against its 1); x, which has
    no class-5 run, is passed over and keeps all of its runs."""
    h = harness(r, slots=7)
    xs = [h.submit(f"x{i}", tenant="x", priority=9, max_tokens=1000) for i in range(4)]
    floods = flood(h)
    assert len(h.running()) == 7
    h.advance(100)
    calm = h.submit("b0", tenant="b", priority=5, max_tokens=10)
    assert h.status(calm) == "running"
    assert statuses(h, xs) == ["running"] * 4
    assert stopped_for_fair_share(h, floods[-1])  # the most recently started
    assert statuses(h, floods[:2]) == ["running"] * 2


def test_one_run_of_a_low_weight_tenant_in_another_class_leaves_fair_share_on(r: redis.Redis) -> None:
    """x (weight 0.1) runs one class-9 request: 10 per weight, the first in ro. Fair share in class 5 still
    takes a flooder's slot for the calm tenant; x's run is untouched."""
    h = harness(r, slots=4)
    h.weight("x", 0.1)
    x = h.submit("x0", tenant="x", priority=9, max_tokens=1000)
    floods = flood(h)
    h.advance(100)
    calm = h.submit("b0", tenant="b", priority=5, max_tokens=10)
    h.sweep()
    assert h.status(calm) == "running" and h.status(x) == "running"
    assert stopped_for_fair_share(h, floods[-1])


def test_a_heavier_tenant_whose_class_runs_are_all_immune_is_passed_over(r: redis.Redis) -> None:
    """p holds 4 class-5 runs, each at its max preemptions (immune), a 3: p is the first in ro, but none of
    its runs may stop, so the calm tenant takes a's newest slot instead of waiting for a run to end."""
    h = harness(r, slots=7, max_pre=1)
    immune = [h.submit(f"p{i}", tenant="p", priority=5, max_tokens=1000) for i in range(4)]
    for rid in immune:
        h.set_preemptions(rid, 1)
    floods = flood(h)
    h.advance(100)
    calm = h.submit("b0", tenant="b", priority=5, max_tokens=10)
    assert h.status(calm) == "running"
    assert statuses(h, immune) == ["running"] * 4
    assert stopped_for_fair_share(h, floods[-1])


def test_the_headroom_is_kept_from_a_flooder_while_a_low_weight_tenant_runs_in_another_class(
        r: redis.Redis) -> None:
    """Headroom 0.25 of 8 slots: x (weight 0.1) runs one class-9 request, the calm tenant one class-5
    request. The flooder of class 5 is the one the calm tenant could take a slot from, so it leaves the
    last 2 slots free, and the calm tenant's next request starts in one with no preemption."""
    h = harness(r, slots=8, fsr=0.25)
    h.weight("x", 0.1)
    x = h.submit("x0", tenant="x", priority=9, max_tokens=1000)
    calm = [h.submit("c0", tenant="calm", max_tokens=1000)]
    floods = [h.submit(f"f{i}", tenant="flood", max_tokens=1000) for i in range(10)]
    assert statuses(h, floods).count("running") == 4 and tickets(h) == 2
    calm.append(h.submit("c1", tenant="calm", max_tokens=1000))
    assert h.status(calm[1]) == "running" and tickets(h) == 1 and h.status(x) == "running"
    assert statuses(h, floods).count("running") == 4 and "preempted" not in statuses(h, floods)


def test_the_headroom_is_kept_from_a_flooder_heavy_only_by_runs_of_a_higher_class(r: redis.Redis) -> None:
    """Headroom 0.25 of 8 slots: the flooder runs 5 class-7 requests, the calm tenant one class-3 request
    (class 3 is the lowest running class). The flooder holds no class-3 run, but once it started one it
    would be the calm tenant's fair-share victim there: its class-3 requests wait, and the calm tenant's
    next two start in the last 2 slots with no preemption (without this, the flooder's first class-3
    request took one of them and was stopped for fair share at once, for the calm tenant's second)."""
    h = harness(r, slots=8, fsr=0.25)
    high = [h.submit(f"f7-{i}", tenant="flood", priority=7, max_tokens=1000) for i in range(5)]
    calm = [h.submit("c3-0", tenant="calm", priority=3, max_tokens=1000)]
    low = [h.submit(f"f3-{i}", tenant="flood", priority=3, max_tokens=1000) for i in range(2)]
    assert statuses(h, low) == ["queued"] * 2 and tickets(h) == 2
    h.advance(10)
    calm += [h.submit(f"c3-{i}", tenant="calm", priority=3, max_tokens=1000) for i in range(1, 3)]
    h.sweep()
    assert statuses(h, calm) == ["running"] * 3 and tickets(h) == 0
    assert statuses(h, high) == ["running"] * 5
    assert statuses(h, low) == ["queued"] * 2 and not set(low) & set(h.dispatched_rids())  # never started


def test_the_headroom_is_kept_from_a_tenant_of_a_higher_class_one_slot_above_the_lightest(
        r: redis.Redis) -> None:
    """Headroom 0.5 of 4 slots: the flooder runs 2 class-7 requests, the calm tenant one class-3 request.
    The calm tenant could not take a slot from the flooder as it is (2 > 2 - 1), but could once the flooder
    started a class-3 run (2 <= 3 - 1): that run would be the one stopped for the calm tenant's next
    request, so the flooder's class-3 request waits and the calm tenant's starts in the last slot."""
    h = harness(r, slots=4, fsr=0.5)
    high = [h.submit(f"f7-{i}", tenant="flood", priority=7, max_tokens=1000) for i in range(2)]
    calm = [h.submit("c3-0", tenant="calm", priority=3, max_tokens=1000)]
    low = h.submit("f3-0", tenant="flood", priority=3, max_tokens=1000)
    assert h.status(low) == "queued" and tickets(h) == 1
    h.advance(10)
    calm.append(h.submit("c3-1", tenant="calm", priority=3, max_tokens=1000))
    h.sweep()
    assert statuses(h, calm) == ["running"] * 2 and statuses(h, high) == ["running"] * 2 and tickets(h) == 0
    assert h.status(low) == "queued" and low not in h.dispatched_rids()  # never started
