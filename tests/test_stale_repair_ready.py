"""A repair pass readies a session's head from the outbox, which it read before that head was dispatched,
ran and finished (a short request; a control master that hangs makes the view up to 30 s old). The control
plane then dispatches the same "rid|attempt" again: its worker's start is refused (the request is done) and
it hands the attempt back. That release must reconcile it as the nothing it did: the data plane's count of
the real attempt's tokens charged the tenant's counter and the token quota the whole request a second time.
The cluster protocol (one call per plane), on one server and on the cluster in its pass."""

from __future__ import annotations

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import Transitions, run_sync
from tests.sched_harness import Harness


def test_a_head_readied_from_a_stale_outbox_read_is_not_charged_twice(r: redis.Redis,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(r, lease_ms=60_000, cluster=True)
    h.add_worker("w0", slots=1)
    r.hset(keys.group_key("default", "cfg"), mapping={"tokens_per_second": 0.001, "burst_tokens": 1000})

    def level() -> float:
        return round(float(r.hget(keys.group_key("default", "qs"), "lvl") or 1000), 2)

    a = h.submit("x", tenant="other", max_tokens=5)  # holds the only slot
    b = h.submit("s", tenant="t", max_tokens=5)  # waits: ready on the control plane, and in the outbox
    assert r.zscore(keys.outbox(keys.bucket_of_session("s")), b) is not None
    ready = Transitions._ready
    charged: list[tuple[float, float]] = []

    async def late_ready(self: Transitions, spec_json: object) -> None:
        if not charged:  # the pass has read b from the outbox; b runs to its end before its ready lands
            h.complete(a)
            h.complete(b)
            charged.append((h.vtc("t"), level()))
        await ready(self, spec_json)

    monkeypatch.setattr(Transitions, "_ready", late_ready)
    run_sync(h.t.repair([keys.bucket_of_session("s")], age_ms=0))
    monkeypatch.setattr(Transitions, "_ready", ready)
    assert charged and h.status(b) == "done"
    h.collect()  # the ghost's start is refused; it is handed back
    assert (h.vtc("t"), level()) == pytest.approx(charged[0])  # [60.0 vs 40.0; 985 vs 990 before the fix]
    assert [e.event for e in h.events("s", b)].count("done") == 1
    assert not r.hgetall(keys.group_key("default", "ri"))  # no run left


def test_a_resumed_attempt_whose_start_is_refused_keeps_the_input_charge(r: redis.Redis) -> None:
    """Only a first attempt is charged for input: a later one refused at its start (cancelled while it
    waited to resume) gives back its own charge, not the input the first attempt sent to the backend."""
    h = Harness(r, lease_ms=60_000, cluster=True)
    h.add_worker("w0", slots=1)
    rid = h.submit("s", tenant="t", max_tokens=5, prompt="x" * 400)  # its input estimated at 100 tokens
    run = h.run_of(rid)
    h.append(run, 2)
    h.runs.remove(run)  # handed back: requeued, attempt 2 dispatched to w0's inbox, not started yet
    run_sync(h.t.hand_back(rid, run.attempt, wid=run.wid, group=run.group, reason="worker_shutdown",
                           return_slot=True))
    assert h.req(rid)["a"] == "1" and run_sync(h.t.cancel(rid)) == ["cancelled"]
    h.collect()  # attempt 2's start is refused (cancelled): handed back as never ran
    # the input (100) and the 2 tokens produced at the output weight (2, the default): charged once
    assert h.vtc("t") == pytest.approx(104.0)  # [4.0: the input given back]
