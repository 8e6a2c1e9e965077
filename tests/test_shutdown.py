"""Graceful shutdown: on SIGTERM a worker stops taking work at once (its slot tickets leave the
idle list), lets runs that can finish within --shutdown-grace-seconds finish, hands the others
back (they resume elsewhere from the tokens so far) and exits 0. Nothing is lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import redis

from sluicegate.sessions import keys
from sluicegate.workers.engines.sim import sim_text
from tests.helpers import Stack, call, fast_settings, submit, wait_for
from tests.worker_helpers import (
    Listener,
    WorkerProcess,
    assert_tickets_balanced,
    idle_tickets,
    token_indices,
    token_text,
)


def test_sigterm_finishes_short_runs_and_hands_back_long_ones(redis_url: str, r: redis.Redis,
                                                               tmp_path: Path) -> None:
    grace = 3.0
    settings = fast_settings(redis_url, sim_tokens_per_second=100.0, slots=4, shutdown_grace_seconds=grace)
    stack = Stack(settings).start(workers=0)
    leaving = WorkerProcess(settings, str(tmp_path / "leaving.log"))
    try:
        base = stack.base_url
        wid = leaving.registered(r)
        short = submit(base, "short", prompt="short one", max_tokens=200)  # ~2 s: fits in the grace
        longs = {submit(base, f"long{i}", prompt=f"long one {i}", max_tokens=600): f"long one {i}" for i in range(2)}
        listeners = {rid: Listener(base, rid) for rid in [short, *longs]}
        for listener in listeners.values():
            started, _ = listener.first(lambda e: e.event == "started")
            assert started.data["worker"] == wid
        assert idle_tickets(r)[wid] == 1
        survivor = stack.add_worker()  # somewhere for the handed-back runs to go

        leaving.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert call("GET", f"{base}/v1/requests/{short}")[1]["status"] == "running"
        wait_for(lambda: wid not in idle_tickets(r), timeout=5, what="the leaving worker's tickets to go")
        assert leaving.wait(grace + 15) == 0
        print(f"\nSIGTERM to exit: {time.monotonic() - signalled:.2f} s (grace {grace} s)")
        assert not r.exists(keys.worker("default", wid)) and not r.hexists(keys.group_key("default", "workers"), wid)

        events = listeners[short].join(30)  # finished within the grace, on the worker it started on
        assert [e.event for e in events if e.event in ("preempted", "resumed")] == []
        assert events[-1].event == "done" and token_indices(events) == list(range(200))
        for rid, prompt in longs.items():  # handed back, resumed on the survivor, nothing lost
            events = listeners[rid].join(30)
            assert [e.data["reason"] for e in events if e.event == "preempted"] == ["worker_shutdown"]
            assert [e.data["worker"] for e in events if e.event == "resumed"] == [survivor]
            assert events[-1].event == "done" and token_indices(events) == list(range(600))
            assert token_text(events) == sim_text(prompt, 600)
        assert_tickets_balanced(r, expected_slots=4)
    finally:
        leaving.close()
        stack.stop()


def test_sigterm_on_an_idle_worker_exits_at_once(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    settings = fast_settings(redis_url, slots=3, shutdown_grace_seconds=30.0)
    stack = Stack(settings).start(api=False, workers=1)
    leaving = WorkerProcess(settings, str(tmp_path / "idle.log"))
    try:
        wid = leaving.registered(r)
        assert_tickets_balanced(r, expected_slots=3 + 3)
        leaving.signal(signal.SIGTERM)
        assert leaving.wait(15) == 0  # no run to wait for: the 30 s grace is not spent
        assert wid not in idle_tickets(r)
        assert_tickets_balanced(r, expected_slots=3)
    finally:
        leaving.close()
        stack.stop()
