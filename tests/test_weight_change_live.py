"""A tenant's weight changed by the operator (PUT /v1/admin/tenants/{t}: scheduler/admin.py set_weight) applies to
fair-share preemption at the next decision, not at the tenant's next run start or stop: its share of the running
slots (`ro`, runs / weight) is rescored with the group's copy of the weight in one call (set_weight.lua). A raised
weight no longer preempts a tenant at its share and then back (a ping-pong); a lowered flooder's weight takes a slot
back at the next sweep. Two PUTs of one tenant racing leave every group's copy at the source's final value.

The scripts are driven directly (tests/sched_harness.py), with the single-server protocol (pinned clock) and the
cluster protocol (one call per plane), the latter on one server and on the cluster in its pass."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions import keys
from sluicegate.sessions.registry import copy_policy
from tests.sched_harness import Harness

PROTOCOLS = [
    # the single-server protocol pins the clock (a global key) and runs both planes in one call: one server only
    pytest.param(False, id="single-server", marks=pytest.mark.single_server),
    pytest.param(True, id="cluster-protocol"),
]


def preempted(h: Harness, sid: str, rid: str) -> list[str]:
    return [e.data.get("reason", "") for e in h.events(sid, rid) if e.event == "preempted"]


@pytest.mark.parametrize("cluster", PROTOCOLS)
def test_a_tenant_at_its_share_after_its_weight_is_raised_is_not_preempted(r: redis.Redis, cluster: bool) -> None:
    h = Harness(r, cluster=cluster)
    h.policy(min_run=0)
    h.add_worker("w0", slots=4)
    whales = [h.submit(f"h{i}", tenant="whale") for i in range(3)]
    light = h.submit("l0", tenant="light")
    assert len(h.running()) == 4
    h.set_weight("whale", 3)  # whale's share is now 3 of 4: it holds exactly its share
    h.advance(100)
    again = h.submit("l1", tenant="light")
    assert h.status(again) == "queued"  # light would hold 2 per weight, whale 2 / 3 after a swap: none
    assert sorted(h.running()) == sorted([*whales, light])
    h.sweep()
    h.advance(100)
    h.sweep()
    assert h.status(again) == "queued"
    assert sorted(h.running()) == sorted([*whales, light])  # the control plane's running set
    assert [h.status(rid) for rid in [*whales, light]] == ["running"] * 4
    assert [preempted(h, f"h{i}", rid) for i, rid in enumerate(whales)] == [[], [], []]
    assert [h.req(rid).get("pc") for rid in [*whales, light]] == [None] * 4
    assert float(r.zscore(keys.group_key("default", "ro"), "whale")) == pytest.approx(1.0)  # 3 runs / 3


@pytest.mark.parametrize("cluster", PROTOCOLS)
def test_a_flooder_whose_weight_is_lowered_gives_a_slot_to_a_waiting_tenant_at_the_next_sweep(
        r: redis.Redis, cluster: bool) -> None:
    h = Harness(r, cluster=cluster)
    h.policy(min_run=0)
    h.set_weight("flood", 10)
    h.add_worker("w0", slots=4)
    floods = [h.submit(f"f{i}", tenant="flood") for i in range(4)]
    h.advance(100)
    calm = h.submit("c0", tenant="calm")
    assert h.status(calm) == "queued"  # flood holds 4 / 10 = 0.4 per weight: calm would hold 1
    hint = keys.group_key("default", "hint")
    r.delete(hint)
    h.set_weight("flood", 1)
    hinted, share = r.llen(hint), float(r.zscore(keys.group_key("default", "ro"), "flood"))
    h.sweep()
    # the control plane's running set (on the cluster protocol the data plane learns of the stop at the hand-back)
    running = h.running()
    assert calm in running and sum(rid in running for rid in floods) == 3
    assert h.status(calm) == "running"
    assert (hinted, share) == (1, pytest.approx(4.0))  # the group's loop was woken; flood's share is 4 / 1


class CopiesAfter:
    """A client whose writes of a weight's group copies (the old HSET of `tw`, the set_weight call) wait until
    `go` is set, and which sets `source_written` once it has written the source: the racing order of two PUTs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.source_written, self.go = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def hset(self, key: str, *args: Any, **kwargs: Any) -> Any:
        if key != keys.TENANT_WEIGHTS:
            await self.go.wait()
        written = await self.inner.hset(key, *args, **kwargs)
        if key == keys.TENANT_WEIGHTS:
            self.source_written.set()
        return written

    async def fcall(self, *args: Any) -> Any:
        await self.go.wait()
        return await self.inner.fcall(*args)


def test_two_racing_weight_puts_leave_every_group_copy_at_the_source(r: redis.Redis) -> None:
    """PUT A (2) writes the source; PUT B (3) writes the source and every copy; only then A writes its copies."""
    h = Harness(r, cluster=True)
    for group in ("default", "g1", "g2"):
        h._group(group)

    async def race() -> None:
        client = h.async_client()
        try:
            slow = CopiesAfter(client)

            async def b() -> None:
                await slow.source_written.wait()
                await Tuning(client).set_weight("acme", 3.0)
                slow.go.set()

            await asyncio.gather(Tuning(slow).set_weight("acme", 2.0), b())
        finally:
            await (client.aclose(close_connection_pool=True) if isinstance(client, AsyncRedis) else client.aclose())

    asyncio.run(race())
    source = float(r.hget(keys.TENANT_WEIGHTS, "acme"))
    copies = {g: float(r.hget(keys.group_key(g, "tw"), "acme")) for g in ("default", "g1", "g2")}
    assert (source, copies) == (3.0, {"default": 3.0, "g1": 3.0, "g2": 3.0})


@pytest.mark.parametrize("cluster", PROTOCOLS)
def test_a_copy_brought_back_to_the_source_rescores_the_tenants_share(r: redis.Redis, cluster: bool) -> None:
    """A PUT that wrote the source and failed before this group's copy: the copy a scheduler's start makes
    (copy_policy) writes the weight as a PUT does, with the tenant's share of the running slots rescored."""
    h = Harness(r, cluster=cluster)
    h.policy(min_run=0)
    h.add_worker("w0", slots=4)
    for i in range(3):
        h.submit(f"h{i}", tenant="whale")
    share = keys.group_key("default", "ro")
    assert float(r.zscore(share, "whale")) == pytest.approx(3.0)  # 3 runs / 1
    r.hset(keys.TENANT_WEIGHTS, "whale", 3)

    async def copy() -> None:
        client = h.async_client()
        try:
            await copy_policy(client, "default")
        finally:
            await (client.aclose(close_connection_pool=True) if isinstance(client, AsyncRedis) else client.aclose())

    asyncio.run(copy())
    assert float(r.hget(keys.group_key("default", "tw"), "whale")) == 3.0
    assert float(r.zscore(share, "whale")) == pytest.approx(1.0)  # 3 runs / 3
