"""A submit the store refused before it stored anything (full under noeviction here; READONLY, CLUSTERDOWN or a
connection that could not be made alike) gives its `max_queued` place back: each retry of a tenant near its
limit took a new place and kept it, so after a short outage the tenant was refused with 429 `tenant_limit`
for about 30 s (api/admission.py SUBMIT_SECONDS). A real OOM on a real Valkey: the server is made to refuse
right after the place is taken, before the submit's call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.sessions import keys
from tests.helpers import Stack, call

ADMIN = {"Authorization": "Bearer admin-secret"}


def config_set(r: redis.Redis, name: str, value: Any) -> None:
    """On the server, or on every node of a cluster (redis-py sends CONFIG SET to one node by default)."""
    if isinstance(r, RedisCluster):
        r.config_set(name, value, target_nodes=RedisCluster.ALL_NODES)
    else:
        r.config_set(name, value)


@pytest.fixture
def refusable(r: redis.Redis) -> Iterator[redis.Redis]:
    """The store under noeviction (as Sluicegate needs it), its policy and maxmemory put back afterwards."""
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    config_set(r, "maxmemory-policy", "noeviction")
    yield r
    config_set(r, "maxmemory", 0)
    config_set(r, "maxmemory-policy", policy)


def refuse_after_the_place(monkeypatch: pytest.MonkeyPatch, stack: Stack, r: redis.Redis) -> None:
    """From the moment a submit's place is taken, the store refuses writes (`maxmemory 1`): the submit's call
    is refused with OOM (the function library's write functions are denied up front), nothing is stored."""
    assert stack._server is not None
    guardrails = stack._server.config.app.state.services.guardrails
    original = guardrails.take_place

    async def take_then_refuse(*args: Any, **kwargs: Any) -> Any:
        give_back = await original(*args, **kwargs)
        config_set(r, "maxmemory", 1)
        return give_back

    monkeypatch.setattr(guardrails, "take_place", take_then_refuse)


def submit(base: str, sid: str, headers: dict[str, str]) -> tuple[int, Any]:
    return call("POST", f"{base}/v1/sessions/{sid}/requests", {"prompt": "x", "max_tokens": 5}, headers=headers)


def test_a_submit_the_store_refused_gives_its_max_queued_place_back(
        idle_auth_stack: Stack, refusable: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    r = refusable
    base = idle_auth_stack.base_url
    key = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[1]["key"]
    acme = {"Authorization": f"Bearer {key}"}
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_queued": 4}, headers=ADMIN)[0] == 200
    code, reply = submit(base, "s0", acme)
    assert code == 202, reply
    queued = reply["request_id"]
    refuse_after_the_place(monkeypatch, idle_auth_stack, r)
    replies = []
    for n in range(3):  # the client retrying as Retry-After asks, each retry a new request id
        try:
            replies.append(submit(base, f"s{n + 1}", acme))
        finally:
            config_set(r, "maxmemory", 0)
    monkeypatch.undo()
    for code, reply in replies:
        assert code == 503 and reply["error"]["type"] == "unavailable", (code, reply)
        assert reply["error"].get("code") != "maybe_stored", reply  # refused: nothing was stored
    places = r.zrange(keys.tenant_active("acme"), 0, -1)
    # the outage is over: the tenant has 1 request of its 4 (the old code: 429 tenant_limit for 30 s)
    codes = [submit(base, f"after{n}", acme)[0] for n in range(2)]
    assert codes == [202, 202], places
    assert places == [queued], "only the stored request held a place"
