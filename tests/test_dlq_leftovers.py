"""A `dlq` entry (a `fail` deadline of a request waiting behind its session's head) whose request ended or was
never stored is dropped by the sweep's check of the group's `dlq`, not kept up to its deadline (a day at most)
past its session (README: "an idle session leaves no key after its TTL"). Two ways left one on a cluster
(issue): a cancel whose control step (withdraw.lua) failed, and a submit whose answers were both lost
(`maybe_stored`), which notes its deadline whether the request was stored or not.

`cluster=True` harnesses run the cluster's two-call transitions (on one server too: the protocol, not the
topology); the sweep's own check runs on one server in its call, on a cluster in the scheduler's reads of the
requests' statuses. Such an entry never recorded a false miss (the data plane's expire keeps a request that is
gone, ended or the head): the last test holds that too."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import MaybeStored, Transitions
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness
from tests.test_deadline_behind_head import dlq

HOUR_MS = 3_600_000
CHECK_MS = 5000  # sweep.lua DLQ_CHECK_MS: how often a batch of dlq is checked
CHECK_BATCH = 50  # sweep.lua DLQ_CHECK


def later(h: Harness, ms: int) -> None:
    """Let `ms` pass: the pinned clock of a one-server harness, else the servers' own."""
    if h.scripts.single_server:
        h.advance(ms)
    else:
        time.sleep(ms / 1000)


def missed(r: redis.Redis, rid: str, priority: int = 5) -> int:
    return int(r.hget(keys.request_prefix(rid) + "m", f"deadlines|default|{priority}|missed") or 0)


def withdraw_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancel's control step fails as an unreachable control master would (the cancel stands)."""
    real = Transitions._call

    async def call(self: Transitions, name: str, keys_: Any, args: Any) -> Any:
        if name == "withdraw":
            raise redis.exceptions.ConnectionError("the control master went away")
        return await real(self, name, keys_, args)

    monkeypatch.setattr(Transitions, "_call", call)


def answers_lost(monkeypatch: pytest.MonkeyPatch, *, stored: bool) -> None:
    """Both answers of the submit's data call lost (MaybeStored), the request stored or not."""
    real = Transitions._submit_call

    async def submit_call(self: Transitions, rid: str, name: str, keys_: Any, args: Any,
                          on_sending: Any = None) -> Any:
        if stored:
            await real(self, rid, name, keys_, args, on_sending)
        raise MaybeStored(rid)

    monkeypatch.setattr(Transitions, "_submit_call", submit_call)


def lost_submit(h: Harness, monkeypatch: pytest.MonkeyPatch, sid: str, name: str, *, stored: bool,
                deadline_ms: int = HOUR_MS) -> str:
    answers_lost(monkeypatch, stored=stored)
    with pytest.raises(MaybeStored):
        h.submit(sid, rid=name, deadline_ms=deadline_ms, fail_on_miss=True)
    monkeypatch.undo()
    return keys.bucket_of_session(sid) + name  # the harness's request id (Harness.submit)


def test_a_cancel_whose_control_step_failed_leaves_no_entry_past_the_next_check(
        r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(r, cluster=True)
    h.add_worker("w1", slots=1)
    head = h.submit("s", max_tokens=100)
    assert h.status(head) == "running"
    behind = h.submit("s", deadline_ms=HOUR_MS, fail_on_miss=True)
    kept = h.submit("s", deadline_ms=HOUR_MS, fail_on_miss=True)
    withdraw_fails(monkeypatch)
    assert h.cancel(behind) == ["cancelled"]
    monkeypatch.undo()
    assert h.status(behind) == "cancelled" and set(dlq(r)) == {f"{behind}|s", f"{kept}|s"}  # the step failed
    h.sweep()
    assert list(dlq(r)) == [f"{kept}|s"]  # the old code: both, the cancelled one's due in an hour
    assert h.status(kept) == "queued" and h.status(head) == "running"
    h.complete(head)
    h.complete(kept)
    assert h.status(kept) == "done" and dlq(r) == {}


def test_a_lost_submit_that_stored_nothing_leaves_no_entry_past_the_next_check(
        r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(r, cluster=True)
    h.add_worker("w1", slots=1)
    head = h.submit("s", max_tokens=100)
    never = lost_submit(h, monkeypatch, "s", "never", stored=False)
    stored = lost_submit(h, monkeypatch, "s", "stored", stored=True)
    assert h.status(never) == "missing" and h.status(stored) == "queued"
    assert set(dlq(r)) == {f"{never}|s", f"{stored}|s"}  # noted both: stored or not, the caller cannot tell
    h.sweep()
    assert list(dlq(r)) == [f"{stored}|s"]  # the old code: both, the one never stored due in an hour
    assert h.status(never) == "missing" and not r.exists(keys.request(never))  # no key made for it
    h.complete(head)
    assert h.status(stored) == "running" and dlq(r) == {}  # readied: its entry went (dispatch.lua ready)
    h.complete(stored)


def test_the_sweep_drops_the_entry_of_a_request_gone_or_ended(r: redis.Redis) -> None:
    """Noted by hand (a one-server transition leaves none: its cancel and its submit are one call each); on the
    cluster pass this is the cluster's check again."""
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w1", slots=2)
    head = h.submit("s", max_tokens=100)
    ended = h.submit("s", deadline_ms=HOUR_MS, fail_on_miss=True)  # behind the head, then the head, then done
    done = h.submit("s2", max_tokens=3)
    h.complete(head)
    h.complete(ended)
    h.complete(done)
    head2 = h.submit("s", max_tokens=100)
    behind = h.submit("s", deadline_ms=HOUR_MS, fail_on_miss=True)
    gone = keys.bucket_of_session("s") + "gone"
    due = float(h.req(behind)["dl"])
    r.zadd(keys.group_key("default", "dlq"), {f"{gone}|s": due, f"{done}|s2": due, f"{ended}|s": due})
    assert len(dlq(r)) == 4
    h.sweep()
    assert list(dlq(r)) == [f"{behind}|s"]  # the old code: all four, due in an hour
    assert h.status(behind) == "queued" and h.status(head2) == "running"
    h.cancel(behind)
    h.cancel(head2)


def test_the_check_goes_through_dlq_in_turn(r: redis.Redis) -> None:
    """More entries than a check takes: an ended one past the first batch goes at a later check."""
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w1", slots=1)
    head = h.submit("s", max_tokens=100)
    live = [h.submit("s", deadline_ms=HOUR_MS, fail_on_miss=True) for _ in range(CHECK_BATCH + 5)]
    last = max(dlq(r).values())
    ended = keys.bucket_of_session("s") + "ended"
    r.zadd(keys.group_key("default", "dlq"), {f"{ended}|s": last + 1})  # ranked after every live one
    h.sweep()
    assert f"{ended}|s" in dlq(r)  # not in the first batch
    later(h, CHECK_MS + 100)
    h.sweep()
    assert f"{ended}|s" not in dlq(r) and len(dlq(r)) == len(live)  # the old code: there, due in an hour
    for rid in live:
        h.cancel(rid)
    h.cancel(head)
    assert dlq(r) == {}


def test_a_leftover_past_its_deadline_records_no_miss_and_makes_no_request(
        r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not reproduced (the old code passes this too): at its deadline such an entry was dropped by the data
    plane's expire (requests.lua d_expire keeps a request gone, ended or the head), with no miss counted."""
    h = Harness(r, cluster=True)
    h.add_worker("w1", slots=1)
    head = h.submit("s", max_tokens=100)
    behind = h.submit("s", deadline_ms=300, fail_on_miss=True)
    withdraw_fails(monkeypatch)
    assert h.cancel(behind) == ["cancelled"]
    monkeypatch.undo()
    never = lost_submit(h, monkeypatch, "s", "never", stored=False, deadline_ms=300)
    assert set(dlq(r)) == {f"{behind}|s", f"{never}|s"}  # no sweep yet: both due before any check
    time.sleep(1.5)  # past both (the lost note is due 1 s after its deadline: LOST_NOTE_MARGIN_MS)
    h.sweep()
    assert dlq(r) == {}
    assert h.status(behind) == "cancelled" and missed(r, behind) == 0  # cancelled before its deadline
    assert not r.exists(keys.request(never)) and missed(r, never) == 0
    assert h.status(head) == "running"
    h.complete(head)
