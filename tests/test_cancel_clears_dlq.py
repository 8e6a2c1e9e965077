"""A cancelled request that waited behind its session's head with a `"on_deadline_miss": "fail"` deadline leaves
no entry in its group's dlq (issue: its "rid|sid" stayed there, and the sweep's next wake pointed at it, until
that deadline, up to MAX_DEADLINE_MS after the session had gone; README: "an idle session leaves no key after its
TTL"). The cancel takes it out: on one server in its own call, on a cluster in its control step (withdraw.lua).
On one server and on a cluster."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, submit, wait_for
from tests.sched_harness import Harness
from tests.test_deadline_behind_head import dlq
from tests.test_ttl import PAST_TTL, TTL, assert_gone

HOUR_MS = 3_600_000


def test_a_cancel_behind_the_head_takes_its_dlq_entry_out(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w1", slots=1)
    head = h.submit("s", max_tokens=100)
    assert h.status(head) == "running"
    behind = h.submit("s", deadline_ms=HOUR_MS, fail_on_miss=True)
    kept = h.submit("s", deadline_ms=HOUR_MS, fail_on_miss=True)  # not cancelled: its entry stays
    assert set(dlq(r)) == {f"{behind}|s", f"{kept}|s"}
    assert h.cancel(behind) == ["cancelled"]
    assert list(dlq(r)) == [f"{kept}|s"]  # the old code: both, the cancelled one's until its deadline
    h.cancel(kept)
    assert dlq(r) == {}  # the old code: both entries
    # the sweep's next wake no longer points at them: nothing here is due within the hour
    _, _, _, wake, now = h.sweep()
    assert wake < 0 or wake - now < HOUR_MS - 60_000, (wake, now)
    assert h.status(head) == "running"
    h.complete(head)
    assert h.status(head) == "done" and dlq(r) == {}


def test_a_cancelled_head_with_a_fail_deadline_leaves_no_entry_either(r: redis.Redis) -> None:
    """The head of a session readied takes its own entry out (dispatch.lua ready); the cancel of one readied late
    (a cluster's lost ready step) or whose entry was noted late must not leave one."""
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w1", slots=1)
    busy = h.submit("s1", max_tokens=100)
    head = h.submit("s2", deadline_ms=HOUR_MS, fail_on_miss=True)  # s2's head, waiting for the slot
    assert h.status(busy) == "running" and h.status(head) == "queued"
    r.zadd(keys.group_key("default", "dlq"), {f"{head}|s2": float(h.req(head)["dl"])})  # noted late
    assert h.cancel(head) == ["cancelled"]
    assert dlq(r) == {}  # the old code: the entry, until the deadline
    h.complete(busy)


@pytest.fixture
def ttl_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, session_ttl=TTL, sim_tokens_per_second=40.0)).start(workers=1)
    yield running
    running.stop()


def test_through_the_api_the_session_leaves_nothing_after_its_ttl(ttl_stack: Stack, r: redis.Redis) -> None:
    """The reviewer's reproduction: a 40-token head, a request behind it with a 1 h `fail` deadline, cancelled;
    past the session's TTL nothing names the session or the request (the old code: "dlq entry still there ...
    due in s 3560")."""
    base = ttl_stack.base_url
    sid = f"dlq-{uuid.uuid4().hex[:8]}"
    head = submit(base, sid, max_tokens=40)
    behind = submit(base, sid, max_tokens=5, deadline_ms=HOUR_MS, on_deadline_miss="fail")
    assert f"{behind}|{sid}" in dlq(r)
    code, view = call("DELETE", f"{base}/v1/requests/{behind}")
    assert code == 200 and view["status"] == "cancelled", view
    assert f"{behind}|{sid}" not in dlq(r)  # the old code: there, due in an hour
    wait_for(lambda: call("GET", f"{base}/v1/requests/{head}")[1]["status"] == "done", timeout=20,
             what="the head to end")
    wait_for(lambda: call("GET", f"{base}/v1/requests/{head}")[0] == 404, timeout=TTL + PAST_TTL + 5,
             what="the session's TTL to pass")
    wait_for(lambda: _gone(base, r, sid, [head, behind]), timeout=PAST_TTL + 5, what="every key of it to go")


def _gone(base: str, r: redis.Redis, sid: str, rids: list[str]) -> bool:
    try:
        assert_gone(base, r, sid, rids)
    except AssertionError:
        return False
    return True
