"""A deadline binds until the first token (sessions/lua/includes/requests.lua ready_spec): a request preempted
after it waits again without one, on a cluster as on one server. On a cluster the control plane requeues it
at the preemption, before the data plane's view arrives with the hand-back; that release re-ranks it without
the deadline, or the deadline sweep would raise it above its class, ahead of same-class work (a priority
inversion), and with "fail" could try to end it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from sluicegate.scheduler.loop import SET_CLASS, Scheduler, write_effective_classes
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import Transitions
from tests.helpers import ON_CLUSTER, fast_settings
from tests.sched_harness import Harness

G = "default"
STORED_EP, STORED_DL, STORED_BO = 7, 12, 14  # where a stored ready spec keeps ep, dl (then dm), bo
#                                             (scheduler/lua/includes/ready_specs.lua STORED_SPEC)


def stored(r: redis.Redis, sid: str) -> list[str]:
    """A session's ready entry, as stored, one value per field ('' when absent)."""
    return r.hget(keys.group_key(G, "rq"), sid).split("|") + [""] * 17


def stored_deadline(r: redis.Redis, sid: str) -> tuple[str, str]:
    """The (dl, dm) of a session's ready entry, as stored ('' when absent)."""
    values = stored(r, sid)
    return values[STORED_DL], values[STORED_DL + 1]


def write_classes(redis_url: str) -> None:
    """A cluster scheduler's write of the effective classes its sweeps noted (epw) to the request hashes
    (scheduler/loop.py); nothing to write on one server, where the sweep writes them itself."""

    async def write() -> None:
        client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            await write_effective_classes(client, G)
        finally:
            await client.aclose()

    asyncio.run(write())


@pytest.mark.parametrize("cluster", [pytest.param(False, marks=pytest.mark.single_server), True])
def test_a_request_preempted_after_its_first_token_waits_without_its_deadline(r: redis.Redis, cluster: bool) -> None:
    h = Harness(r, cluster=cluster)
    h.add_worker("w", slots=1)
    # a promotion window as long as the deadline: a request still holding it is boosted at the next sweep
    h.policy(min_run=0, dlw=60_000)
    a = h.submit("a", tenant="ta", priority=3, max_tokens=50, deadline_ms=60_000, fail_on_miss=True)
    run = h.run_of(a)
    assert h.append(run, 3)[0] == 1  # its first token: the deadline is met, and binds no more
    hi = h.submit("hi", tenant="tc", priority=7, max_tokens=5)  # preempts a
    h.handback(run, reason="priority")  # on a cluster: the data plane's view reaches the control plane
    assert h.status(a) == "preempted" and h.running() == [hi]
    assert stored_deadline(r, "a") == ("", "")
    assert r.zscore(keys.group_key(G, "dlp"), "a") is None and r.zscore(keys.group_key(G, "dld"), "a") is None
    hi2 = h.submit("hi2", tenant="tc", priority=7, max_tokens=5)
    b = h.submit("b", tenant="aa", priority=3, max_tokens=5)  # a's class; its tenant first in the fair order
    assert h.sweep()[1] == 0  # nothing raised: a's deadline no longer binds
    h.complete(hi)
    h.complete(hi2)
    # the class-3 work in the fair order ("aa" before "ta" at equal counters), a no longer ahead of it
    assert h.dispatched_rids()[-1] == b and h.running() == [b]
    h.complete(b)
    assert h.running() == [a] and h.status(a) == "running"


@pytest.mark.parametrize("cluster", [pytest.param(False, marks=pytest.mark.single_server), True])
def test_a_deadline_boost_goes_with_the_deadline_at_the_first_token(r: redis.Redis, redis_url: str,
                                                                    cluster: bool) -> None:
    """A request the deadline sweep raised before it ran waits at its own class once its first token came: not
    ahead of same-class work that the fair order puts first, and shown so (effective_priority)."""
    h = Harness(r, cluster=cluster)
    h.policy(min_run=0, dlw=60_000)  # its slack is short enough at once: the next sweep raises it
    busy = h.submit("busy", tenant="tb", priority=9, max_tokens=5)
    a = h.submit("a", tenant="ta", priority=3, max_tokens=50, deadline_ms=60_000, fail_on_miss=True)
    assert h.sweep()[1] == 1 and stored(r, "a")[STORED_EP] == "4"  # raised one class (dlb 1), below busy's
    h.add_worker("w", slots=1)
    h.complete(busy)
    run = h.run_of(a)
    assert h.append(run, 3)[0] == 1  # its first token: the deadline is met, and binds no more
    hi = h.submit("hi", tenant="tc", priority=7, max_tokens=5)  # preempts a
    h.handback(run, reason="priority")
    assert h.status(a) == "preempted" and h.running() == [hi]
    entry = stored(r, "a")
    assert (entry[STORED_EP], entry[STORED_BO]) == ("", "")  # its own class (ep stored only when not p), no boost
    assert r.zscore(keys.group_key(G, "c3:ta"), "a") is not None
    assert r.zscore(keys.group_key(G, "c4:ta"), "a") is None and r.hget(keys.group_key(G, "cn"), "4") is None
    write_classes(redis_url)  # a cluster scheduler's late write of the boost, and of its end after it
    assert h.req(a)["ep"] == "3"
    hi2 = h.submit("hi2", tenant="tc", priority=7, max_tokens=5)
    b = h.submit("b", tenant="aa", priority=3, max_tokens=5)  # a's class; its tenant first in the fair order
    h.complete(hi)
    h.complete(hi2)
    assert h.dispatched_rids()[-1] == b and h.running() == [b]
    h.complete(b)
    assert h.running() == [a]


def sweep_as_a_cluster_scheduler(redis_url: str) -> int:
    """One sweep of the group by a real scheduler on the cluster's protocol (on one server: the cluster's
    functions, as Harness(cluster=True) calls them); returns how many requests it promoted."""

    async def sweep() -> int:
        scheduler = Scheduler(fast_settings(redis_url))
        if not ON_CLUSTER:
            scheduler.cluster = True
            scheduler.scripts = Scripts(scheduler.redis, single_server=False)
            scheduler.transitions = Transitions(scheduler.scripts, lease_ms=scheduler.lease_ms,
                                                session_ttl=scheduler.settings.session_ttl)
        promoted = 0
        sweep = scheduler.transitions.sweep

        async def counted(group: str) -> Any:
            nonlocal promoted
            result = await sweep(group)
            promoted += result.promoted
            return result

        scheduler.transitions.sweep = counted  # type: ignore[method-assign]
        try:
            await scheduler.sweep_once(G)
        finally:
            await scheduler.redis.aclose()
        return promoted

    return asyncio.run(sweep())


def test_a_boost_dropped_at_a_hand_back_is_shown_after_the_next_sweep(r: redis.Redis, redis_url: str) -> None:
    """The end of a boost, noted at the hand-back (runs.lua release), is written by the scheduler that sweeps
    next, though that sweep promotes nothing. The hand-back's ready_spec shows the request's own class at once,
    but a scheduler that popped the boost's entry before it writes the boost after it (the race release's note
    is there for): the request then showed its boosted class while it waited and ran at its own, until some
    later sweep of its group promoted a request (docs/cluster.md)."""
    h = Harness(r, cluster=True)
    h.policy(min_run=0, dlw=60_000)  # its slack is short enough at once: the next sweep raises it
    busy = h.submit("busy", tenant="tb", priority=9, max_tokens=5)
    a = h.submit("a", tenant="ta", priority=3, max_tokens=50, deadline_ms=60_000, fail_on_miss=True)
    assert h.sweep()[1] == 1 and stored(r, "a")[STORED_EP] == "4"  # raised one class (dlb 1)
    epw = keys.group_key(G, "epw")
    assert r.lpop(epw, 100) == [f"{a}|4"]  # a scheduler's write_effective_classes pops the boost's entry...
    h.add_worker("w", slots=1)
    h.complete(busy)
    run = h.run_of(a)
    assert h.append(run, 3)[0] == 1  # its first token: the deadline binds no more, nor its boost
    h.submit("hi", tenant="tc", priority=7, max_tokens=5)  # preempts a
    h.handback(run, reason="priority")
    assert h.status(a) == "preempted" and stored(r, "a")[STORED_EP] == ""  # waits at its own class
    assert h.req(a)["ep"] == "3"  # (the data plane's hand-back shows it so)
    r.eval(SET_CLASS, 1, keys.request(a), "4")  # ...and writes it only now
    assert h.req(a)["ep"] == "4"
    assert sweep_as_a_cluster_scheduler(redis_url) == 0  # the next sweep promotes nothing
    assert h.req(a)["ep"] == "3"
