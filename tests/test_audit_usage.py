"""The audit log of admin changes and usage for chargeback (counted where requests end, folded into
hourly hashes exactly once). Real Valkey, on one server and on a cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from sluicegate.api import audit
from sluicegate.sessions import keys, usage
from sluicegate.sessions.connect import async_client
from sluicegate.sessions.requests import estimate_tokens
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, submit, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
def authed(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=1)
    yield running
    running.stop()


def test_every_admin_change_is_in_the_audit_log_newest_first(authed: Stack) -> None:
    base = authed.base_url
    code, key = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme", "expires_in": 3600}, ADMIN)
    assert code == 201
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"weight": 3.0, "max_queued": 5}, ADMIN)[0] == 200
    assert call("PUT", f"{base}/v1/admin/groups/default", {"requests_per_second": 10, "burst": 5}, ADMIN)[0] == 200
    assert call("DELETE", f"{base}/v1/admin/keys/{key['key_id']}", None, ADMIN)[0] == 200
    code, listing = call("GET", f"{base}/v1/admin/audit", None, ADMIN)
    assert code == 200
    entries = listing["entries"]
    assert [e["action"] for e in entries] == ["key.revoke", "group.update", "tenant.update", "key.create"]
    assert all(e["key_id"] == "admin" and set(e) == {"at", "key_id", "action", "target", "before", "after"}
               for e in entries)
    assert [e["at"] for e in entries] == sorted((e["at"] for e in entries), reverse=True)
    revoke, group, tenant, create = entries
    assert create["target"] == key["key_id"] and create["before"] is None
    assert create["after"]["tenant"] == "acme" and create["after"]["expires_at"] == key["expires_at"]
    assert revoke["before"]["key_id"] == key["key_id"] and revoke["after"] is None
    assert tenant["before"]["weight"] == 1.0 and tenant["after"]["weight"] == 3.0
    assert tenant["before"]["max_queued"] is None and tenant["after"]["max_queued"] == 5
    assert group["target"] == "default" and group["after"]["quota"]["requests_per_second"] == 10
    assert key["key"] not in str(listing)  # a key is shown once, at its creation, never in the log
    assert [e["action"] for e in call("GET", f"{base}/v1/admin/audit?limit=2", None, ADMIN)[1]["entries"]] == [
        "key.revoke", "group.update"]
    assert call("GET", f"{base}/v1/admin/audit?limit=0", None, ADMIN)[0] == 422
    # A tenant key reads neither the audit log nor usage.
    _, tenant_key = call("POST", f"{base}/v1/admin/keys", {"tenant": "beta"}, ADMIN)
    as_tenant = {"Authorization": f"Bearer {tenant_key['key']}"}
    assert call("GET", f"{base}/v1/admin/audit", None, as_tenant)[0] == 403
    assert call("GET", f"{base}/v1/admin/usage", None, as_tenant)[0] == 403


def test_a_change_of_a_groups_deadlines_is_in_the_audit_log(authed: Stack) -> None:
    base = authed.base_url
    url = f"{base}/v1/admin/groups/default"
    assert call("PUT", url, {"deadlines_ms": {"high": 2000, "0": 60000}}, ADMIN)[0] == 200
    assert call("PUT", url, {"deadlines_ms": {"7": 1500, "0": None}}, ADMIN)[0] == 200
    assert call("PUT", url, {"burst": 4}, ADMIN)[0] == 200  # the deadlines stay as they were
    entries = call("GET", f"{base}/v1/admin/audit", None, ADMIN)[1]["entries"]
    kept, changed, first = entries[:3]
    assert all(e["action"] == "group.update" and e["target"] == "default" for e in (kept, changed, first))
    assert first["before"]["deadlines_ms"] == {} and first["after"]["deadlines_ms"] == {"0": 60000, "7": 2000}
    assert changed["before"]["deadlines_ms"] == {"0": 60000, "7": 2000}
    assert changed["after"]["deadlines_ms"] == {"7": 1500}
    assert kept["before"]["deadlines_ms"] == kept["after"]["deadlines_ms"] == {"7": 1500}
    assert kept["after"]["quota"]["burst"] == 4
    # What the log shows is what GET /v1/admin/groups shows.
    groups = call("GET", f"{base}/v1/admin/groups", None, ADMIN)[1]["groups"]
    assert next(g for g in groups if g["group"] == "default")["deadlines_ms"] == kept["after"]["deadlines_ms"]


def test_the_audit_log_is_capped(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "AUDIT_MAX", 3)
    stack = Stack(fast_settings(redis_url)).start(workers=0)
    try:
        for weight in (1.5, 2.0, 2.5, 3.0, 3.5):
            assert call("PUT", f"{stack.base_url}/v1/admin/tenants/acme", {"weight": weight})[0] == 200
        entries = call("GET", f"{stack.base_url}/v1/admin/audit")[1]["entries"]
        assert [e["after"]["weight"] for e in entries] == [3.5, 3.0, 2.5]
        assert entries[0]["key_id"] is None  # auth off: no key made the change
    finally:
        stack.stop()


def test_usage_counts_requests_and_tokens_per_tenant_group_and_hour(redis_url: str) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=1)
    base = stack.base_url
    try:
        prompt = "a prompt of some forty characters......"
        done = [submit(base, "u-1", tenant="acme", max_tokens=5, prompt=prompt),
                submit(base, "u-2", tenant="acme", max_tokens=7, prompt=prompt),
                submit(base, "u-3", tenant="beta", max_tokens=3, prompt=prompt)]
        for rid in done:
            wait_for(lambda rid=rid: call("GET", f"{base}/v1/requests/{rid}")[1]["status"] == "done")
        # A request cancelled before it started costs no input tokens, but counts as a request.
        stack.stop_service(next(iter(stack.workers)))
        queued = submit(base, "u-4", tenant="beta", max_tokens=3, prompt=prompt)
        assert call("DELETE", f"{base}/v1/requests/{queued}")[0] == 200
        code, report = call("GET", f"{base}/v1/admin/usage")
        assert code == 200, report
        hour = int(time.time()) // 3600 * 3600
        rows = {(row["tenant"], row["group"]): row for row in report["usage"]}
        tokens_in = estimate_tokens(prompt)
        assert rows[("acme", "default")] == {"hour": hour, "tenant": "acme", "group": "default", "requests": 2,
                                             "input_tokens": 2 * tokens_in, "output_tokens": 12,
                                             "hour_utc": datetime.fromtimestamp(hour, UTC).strftime(
                                                 "%Y-%m-%dT%H:%M:%SZ")}
        assert rows[("beta", "default")]["requests"] == 2
        assert rows[("beta", "default")]["input_tokens"] == tokens_in
        assert rows[("beta", "default")]["output_tokens"] == 3
        assert report["totals"] == {"requests": 4, "input_tokens": 3 * tokens_in, "output_tokens": 15}
        # Read again: folded once, the same numbers.
        assert call("GET", f"{base}/v1/admin/usage")[1]["totals"] == report["totals"]
        only = call("GET", f"{base}/v1/admin/usage?tenant=beta")[1]
        assert [row["tenant"] for row in only["usage"]] == ["beta"]
        assert call("GET", f"{base}/v1/admin/usage?group=other")[1]["usage"] == []
        assert call("GET", f"{base}/v1/admin/usage?since={time.time() + 7200}")[1]["usage"] == []
        iso = datetime.fromtimestamp(hour, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert call("GET", f"{base}/v1/admin/usage?since={iso}")[1]["totals"] == report["totals"]
        assert call("GET", f"{base}/v1/admin/usage?since=yesterday")[0] == 422
        for odd in ("nan", "inf", "-inf", "1e400"):  # floats, but no hour to start from: 422, not a 500
            status, body = call("GET", f"{base}/v1/admin/usage?since={odd}")
            assert (status, body["error"]["type"]) == (422, "invalid_request"), (odd, status, body)
    finally:
        stack.stop()


def test_a_fold_that_died_half_way_is_finished_by_the_next_without_counting_twice(redis_url: str) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=1)
    try:
        rids = [submit(stack.base_url, f"fold-{i}", tenant="acme", max_tokens=2) for i in range(6)]
        for rid in rids:
            wait_for(lambda rid=rid: call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "done")
    finally:
        stack.stop()

    async def scenario() -> tuple[int, int]:
        redis = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            bucket = keys.bucket_of_request(rids[0])
            # A folder takes the bucket's pending usage, applies it to its hour, then dies before dropping it.
            taken = await usage.take(redis, bucket)
            assert taken is not None
            await usage.apply(redis, bucket, *taken)
            # Two folders now run at once: the half-done fold is finished once, the others folded once.
            await asyncio.gather(usage.fold(redis), usage.fold(redis))
            rows = await usage.usage(redis, since=time.time() - 60)
            assert not await redis.exists(keys.usage_folding(bucket))
            return sum(r["requests"] for r in rows), sum(r["output_tokens"] for r in rows)
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()) == (6, 12)


def test_a_fold_after_the_servers_clock_stepped_back_is_still_counted(redis_url: str) -> None:
    """An hour applies a bucket's fold only past the last sequence it noted. The last fold was stamped
    by a clock an hour ahead (NTP stepped it back since, or a failover moved the bucket to a host running
    behind): the next fold's sequence must still come after it, or its counts are dropped."""
    hour = int(time.time()) // 3600 * 3600
    ahead = (int(time.time()) + 3600) * 1_000_000  # a sequence from a clock an hour ahead

    async def scenario() -> list[dict]:
        redis = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            bucket = keys.bucket_of_session("stepped")
            await redis.hset(keys.usage_pending(bucket), f"{hour}|acme|default|r", 1)
            taken = await usage.take(redis, bucket)
            assert taken is not None and int(taken[0]) <= ahead
            await redis.delete(keys.usage_folding(bucket))
            # as the last fold of the clock ahead left it: the bucket's sequence, and the hour's mark
            await redis.set(keys.usage_sequence(bucket), str(ahead))
            await redis.hset(keys.usage_hour(hour), f"@{bucket}", str(ahead))
            await redis.hset(keys.usage_pending(bucket), f"{hour}|acme|default|r", 2)
            await redis.hset(keys.usage_pending(bucket), f"{hour}|acme|default|o", 7)
            await usage.fold(redis)
            assert not await redis.exists(keys.usage_folding(bucket))
            assert 0 < await redis.ttl(keys.usage_sequence(bucket)) <= usage.USAGE_TTL
            return await usage.usage(redis, since=hour, tenant="acme")
        finally:
            await redis.aclose()

    rows = asyncio.run(scenario())
    assert [(r["requests"], r["output_tokens"]) for r in rows] == [(2, 7)]
