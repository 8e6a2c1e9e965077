"""A `"on_deadline_miss": "fail"` deadline of a request that waits behind its own session's head (issue: it
stayed `queued` until the head ended, then failed, long after its deadline). Only a session's head is readied,
so the submit notes such a request in its group's `dlq` and the sweep ends it at its deadline; an entry for a
request that became the head, started or ended meanwhile does nothing. On one server and on a cluster."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import MaybeStored, Transitions
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, submit, wait_for
from tests.sched_harness import Harness

DEADLINE_MS = 1000


def later(h: Harness, ms: int) -> None:
    """Let `ms` pass: the pinned clock on one server, the servers' own on a cluster."""
    if ON_CLUSTER:
        time.sleep(ms / 1000)
    else:
        h.advance(ms)


def errors(h: Harness, sid: str, rid: str) -> list[str]:
    return [e.data["message"] for e in h.events(sid, rid) if e.event == "error"]


def dlq(r: redis.Redis) -> dict[str, float]:
    return dict(r.zrange(keys.group_key("default", "dlq"), 0, -1, withscores=True))


def test_a_fail_deadline_behind_the_sessions_running_head_ends_at_the_deadline(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w1", slots=1)
    head = h.submit("s", max_tokens=100)
    assert h.status(head) == "running"
    doomed = h.submit("s", deadline_ms=DEADLINE_MS, fail_on_miss=True)
    late_ok = h.submit("s", deadline_ms=DEADLINE_MS)  # "run": it waits, and runs late
    h.sweep()
    assert h.status(doomed) == "queued"  # not due yet
    later(h, DEADLINE_MS + 200)
    h.sweep()
    assert h.status(doomed) == "failed"  # the old code: "queued" until the head ended
    (message,) = errors(h, "s", doomed)
    assert message.startswith("deadline_exceeded: not started"), message
    assert h.req(doomed)["dmt"] == "0" and not dlq(r)
    assert h.status(head) == "running" and h.status(late_ok) == "queued"  # the head's run goes on
    h.complete(head)
    h.complete(late_ok)
    assert h.status(head) == "done" and h.status(late_ok) == "done"
    assert [e.event for e in h.events("s", head)][-1] == "done" and errors(h, "s", head) == []


def test_a_due_entry_of_a_request_that_became_the_head_started_or_ended_does_no_harm(r: redis.Redis) -> None:
    """Each of these had its deadline noted behind the head. Readying a head takes its entry out (its deadline
    is dld's then); an entry noted late (on a cluster the submitter's note can land after the request was
    readied) is put back by hand here: the sweep must leave each alone, or end it once, as the head it is."""
    h = Harness(r, cluster=ON_CLUSTER)
    h.policy(max_pre=0)  # no preemption: each run below keeps its slot
    h.add_worker("w1", slots=2)
    first = h.submit("s1", max_tokens=3)
    ended = h.submit("s1", deadline_ms=DEADLINE_MS, fail_on_miss=True, max_tokens=3)
    started = h.submit("s1", deadline_ms=DEADLINE_MS, fail_on_miss=True)
    long_head = h.submit("s2", max_tokens=100)  # the second slot: s2's next one waits behind it
    behind = h.submit("s2", deadline_ms=DEADLINE_MS, fail_on_miss=True)
    h.complete(first)
    h.complete(ended)
    assert h.status(ended) == "done" and h.status(started) == "running"
    # readied as heads, both left dlq; the one still behind is there
    assert list(dlq(r)) == [f"{behind}|s2"]
    queued_head = h.submit("s4", max_tokens=3)  # both slots are taken: it waits
    headed = h.submit("s4", deadline_ms=DEADLINE_MS, fail_on_miss=True)
    assert h.status(queued_head) == "queued" and f"{headed}|s4" in dlq(r)
    h.cancel(queued_head)  # `headed` becomes s4's head: readied, and waits for a slot
    assert f"{headed}|s4" not in dlq(r) and h.waiting_rid("s4") == headed
    due = float(h.req(ended)["dl"]) + 1
    r.zadd(keys.group_key("default", "dlq"), {f"{ended}|s1": due, f"{started}|s1": due, f"{headed}|s4": due})
    later(h, DEADLINE_MS + 200)
    h.sweep()
    assert h.status(behind) == "failed"  # still behind its head: ended (the old code: "queued")
    assert h.status(ended) == "done" and h.status(started) == "running" and h.status(long_head) == "running"
    assert errors(h, "s1", ended) == [] and errors(h, "s1", started) == []
    assert h.status(headed) == "failed" and len(errors(h, "s4", headed)) == 1  # by dld, once
    assert not dlq(r)
    # still its worker's: no first token by the deadline, its timer ends the run (requests.lua d_finish)
    h.finish(h.run_of(started), outcome="failed", detail="deadline_exceeded")
    assert h.status(started) == "failed" and len(errors(h, "s1", started)) == 1
    h.complete(long_head)
    assert h.status(long_head) == "done"


def test_through_the_api_it_fails_while_the_head_still_runs(redis_url: str) -> None:
    """The reviewer's reproduction: the head streams ~10 s at 20 tokens/s; the request behind it with a 300 ms
    `fail` deadline ends failed while the head still runs (the old code: only once the head ended)."""
    stack = Stack(fast_settings(redis_url, sim_tokens_per_second=20.0)).start(workers=1)
    try:
        base = stack.base_url
        head = submit(base, "dl-behind", max_tokens=200)
        doomed = submit(base, "dl-behind", max_tokens=5, deadline_ms=300, on_deadline_miss="fail")
        view = wait_for(lambda: (v := call("GET", f"{base}/v1/requests/{doomed}")[1])["status"] == "failed" and v,
                        timeout=4, what="the request behind the head to fail at its deadline")
        assert view["deadline_met"] is False and view["error"].startswith("deadline_exceeded"), view
        assert call("GET", f"{base}/v1/requests/{head}")[1]["status"] == "running"
        assert call("DELETE", f"{base}/v1/requests/{head}")[0] == 200
    finally:
        stack.stop()


def test_a_submit_whose_answers_were_lost_is_noted_all_the_same(redis_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cluster the note is the API's second call, after the data plane's answer: a submit that stored the
    request but lost both answers (503 `maybe_stored`) made no note, and the request stayed `queued` past its
    deadline until the head ended. One server notes it in the submit's own call."""
    stack = Stack(fast_settings(redis_url, sim_tokens_per_second=20.0)).start(workers=1)
    try:
        base = stack.base_url
        head = submit(base, "dl-lost", max_tokens=200)  # ~10 s
        real = Transitions._submit_call

        async def answers_lost(self: Transitions, rid: str, name: str, keys_: Any, args: Any,
                               on_sending: Any = None) -> Any:
            await real(self, rid, name, keys_, args, on_sending)  # stored; both answers lost
            raise MaybeStored(rid)

        monkeypatch.setattr(Transitions, "_submit_call", answers_lost)
        code, body = call("POST", f"{base}/v1/sessions/dl-lost/requests",
                          {"prompt": "x", "max_tokens": 5, "deadline_ms": 300, "on_deadline_miss": "fail"})
        monkeypatch.undo()
        assert code == 503 and body["error"]["code"] == "maybe_stored", body
        doomed = body["error"]["message"].split("/v1/requests/")[1].split(" ")[0]
        wait_for(lambda: call("GET", f"{base}/v1/requests/{doomed}")[1]["status"] == "failed", timeout=8,
                 what="the request behind the head to fail near its deadline")  # [cluster: still queued]
        assert call("GET", f"{base}/v1/requests/{head}")[1]["status"] == "running"
        assert call("DELETE", f"{base}/v1/requests/{head}")[0] == 200
    finally:
        stack.stop()
