"""Strict priority classes: a higher class always dispatches first (zero inversions at dispatch)."""

from __future__ import annotations

import random

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings, submit, wait_for
from tests.sched_harness import Harness


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_one_slot_dispatches_strictly_by_class(r: redis.Redis) -> None:
    """Requests of classes 0..9 (three of each, shuffled, several tenants) queued before the only slot
    appears run highest class first; inside a class, one tenant's requests keep their FIFO order."""
    h = Harness(r)
    h.policy(max_pre=0)
    order = [(cls, i) for cls in range(10) for i in range(3)]
    random.Random(7).shuffle(order)
    rids: dict[str, tuple[int, int]] = {}
    # A huge counter for tenant t0 (classes 0, 3, 6, 9) must not matter: classes come before fairness.
    r.hset(keys.group_key("default", "vtc"), "t0", 1e9)
    for cls, i in order:
        h.advance(1)
        rids[h.submit(f"s{cls}-{i}", priority=cls, tenant=f"t{cls % 3}")] = (cls, i)
    h.add_worker("w1", slots=1)
    for _ in order:
        h.complete(h.runs[0].rid)
    classes = [rids[rid][0] for rid in h.dispatched_rids()]
    assert classes == sorted(classes, reverse=True)
    assert len(h.dispatched_rids()) == len(set(h.dispatched_rids())) == 30
    # Same class, same tenant: submission order.
    submitted_at = {rid: int(h.req(rid)["sub"]) for rid in rids}
    for cls in range(10):
        same = [rid for rid in h.dispatched_rids() if rids[rid][0] == cls]
        assert [submitted_at[x] for x in same] == sorted(submitted_at[x] for x in same)


@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_random_mix_has_zero_inversions(r: redis.Redis) -> None:
    """A random interleaving of submits (random sessions, tenants, classes) and completions on two slots:
    whenever a request is dispatched, no ready session head of a higher class is left waiting. Checked
    against an independent model of the session queues, and against the ready structures in Redis."""
    h = Harness(r)
    h.policy(max_pre=0)  # preemption has its own tests; here only the dispatch order matters
    h.add_worker("w1", slots=1)
    h.add_worker("w2", slots=1)
    rng = random.Random(3)
    queues: dict[str, list[str]] = {}
    cls_of: dict[str, int] = {}
    running: set[str] = set()
    dispatches = 0

    def check(new_runs: list[str]) -> None:
        nonlocal dispatches
        for rid in new_runs:
            sid = h.req(rid)["sid"]
            assert queues[sid][0] == rid, "only a session's head may run"
            assert not any(x in running for x in queues[sid]), "two runs in one session"
            running.add(rid)
        waiting = [q[0] for q in queues.values() if q and q[0] not in running]
        top_waiting = max((cls_of[x] for x in waiting), default=-1)
        for rid in new_runs:
            assert cls_of[rid] >= top_waiting, f"inversion: class {cls_of[rid]} ran while {top_waiting} waited"
        ready_classes = [int(c) for c in r.zrange(keys.group_key("default", "cls"), 0, -1)]
        assert sorted(ready_classes) == sorted({cls_of[x] for x in waiting})
        dispatches += len(new_runs)

    for _ in range(400):
        h.advance(rng.randint(0, 3))
        if rng.random() < 0.55 or not h.runs:
            sid = f"s{rng.randint(0, 11)}"
            before = len(h.dispatched)
            cls = rng.randint(0, 9)
            rid = h.submit(sid, priority=cls, tenant=f"t{rng.randint(0, 2)}", max_tokens=2)
            cls_of[rid] = cls
            queues.setdefault(sid, []).append(rid)
            check([run.rid for run in h.dispatched[before:]])
        else:
            run = rng.choice(h.runs)
            before = len(h.dispatched)
            h.complete(run.rid)
            running.discard(run.rid)
            queues[h.req(run.rid)["sid"]].remove(run.rid)
            check([x.rid for x in h.dispatched[before:]])
    assert dispatches > 100


def test_priority_names_through_the_api(redis_url: str) -> None:
    """low/normal/high/critical map to 2/5/7/9 and order dispatch exactly like the numbers; /v1/admin/stats
    shows the queue by group, priority and tenant while nothing can run."""
    stack = Stack(fast_settings(redis_url)).start(workers=0)
    try:
        base = stack.base_url
        wanted = [("low", 2), (1, 1), ("critical", 9), ("normal", 5), (8, 8), ("high", 7), (0, 0)]
        rids = {}
        for i, (name, cls) in enumerate(wanted):
            rids[submit(base, f"names-{i}", priority=name, max_tokens=3, tenant="acme")] = cls
        code, err = call("POST", f"{base}/v1/sessions/bad/requests", {"prompt": "x", "priority": "urgent"})
        assert 400 <= code < 500 and "error" in err
        code, stats = call("GET", f"{base}/v1/admin/stats")
        assert code == 200
        depth = {(d["group"], d["priority"], d["tenant"]): d["queued"] for d in stats["queue_depth"]}
        assert depth == {("default", cls, "acme"): 1 for cls in rids.values()}
        for rid, cls in rids.items():
            code, view = call("GET", f"{base}/v1/requests/{rid}")
            assert code == 200 and view["priority"] == cls and view["status"] == "queued"
        stack.add_worker(slots=1)

        def all_done() -> list[dict] | None:
            views = [call("GET", f"{base}/v1/requests/{rid}")[1] for rid in rids]
            return views if all(v["status"] == "done" for v in views) else None

        views = wait_for(all_done, timeout=30, what="all requests done")
        by_start = sorted(views, key=lambda v: v["started_at"])
        assert [v["priority"] for v in by_start] == sorted(rids.values(), reverse=True)
    finally:
        stack.stop()
