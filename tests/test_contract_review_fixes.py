"""The contract review's fixes (/tmp/rev/report-contract.md), on one server and on a cluster. A request
cancelled after its deadline passed with no first token missed its deadline (`deadline_met` false, counted
in sluicegate_deadlines_total{outcome="missed"}), whatever its on_deadline_miss: before, it stayed null and
uncounted, so the late requests clients gave up on flattered the met/missed ratio. One cancelled before its
deadline, or after a first token that judged it, keeps what it had. (The 405's Allow: tests/test_bad_input.py.)"""

from __future__ import annotations

import time

import redis

from sluicegate.workers.engines.sim import SimEngine
from tests.helpers import Stack, call, fast_settings, submit, wait_for
from tests.metrics_helpers import scrape, total


def view(base: str, rid: str) -> dict[str, object]:
    return call("GET", f"{base}/v1/requests/{rid}")[1]


def deadlines(base: str, outcome: str) -> float:
    return total(scrape(base), "sluicegate_deadlines_total", group="default", outcome=outcome)


def after_deadline(base: str, rid: str) -> None:
    """Until its deadline has passed (`deadline_at` is on the store's clock, this host's), with a margin."""
    time.sleep(max(0.0, float(view(base, rid)["deadline_at"]) - time.time()) + 0.1)  # type: ignore[arg-type]


def cancel(base: str, rid: str) -> dict[str, object]:
    code, reply = call("DELETE", f"{base}/v1/requests/{rid}")
    assert code == 200 and reply["status"] == "cancelled", (code, reply)
    return view(base, rid)


def test_a_waiting_request_cancelled_past_its_deadline_missed_it(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0)  # no worker: everything waits
    try:
        base = stack.base_url
        late = submit(base, "late", prompt="x", max_tokens=3, deadline_ms=100)  # on_deadline_miss "run"
        early = submit(base, "early", prompt="x", max_tokens=3, deadline_ms=60_000)
        plain = submit(base, "plain", prompt="x", max_tokens=3)
        after_deadline(base, late)
        assert view(base, late)["status"] == "queued" and view(base, late)["deadline_met"] is None
        assert deadlines(base, "missed") == 0

        seen = cancel(base, late)
        assert seen["deadline_met"] is False, seen
        assert deadlines(base, "missed") == 1 and deadlines(base, "met") == 0
        # before its deadline: not judged; without one: nothing to judge
        assert cancel(base, early)["deadline_met"] is None
        assert (cancel(base, plain)["deadline_met"], view(base, plain)["deadline_at"]) == (None, None)
        assert deadlines(base, "missed") == 1 and deadlines(base, "met") == 0
        assert call("DELETE", f"{base}/v1/requests/{late}")[0] == 409  # a second cancel counts nothing more
        assert deadlines(base, "missed") == 1
    finally:
        stack.stop()


def test_a_running_request_cancelled_past_its_deadline_before_its_first_token_missed_it(
        redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0)
    try:
        base = stack.base_url
        # every first token 3 s after the engine is called, then 5 tokens/s
        stack.add_worker(engine=SimEngine(tokens_per_second=5.0, prefill_ms=3000.0))
        late = submit(base, "late", prompt="x", max_tokens=100, deadline_ms=200)
        on_time = submit(base, "on-time", prompt="x", max_tokens=100, deadline_ms=30_000)
        wait_for(lambda: view(base, late)["status"] == "running", what="the late request to start")
        after_deadline(base, late)
        assert view(base, late)["deadline_met"] is None  # still no first token (3 s of prefill)
        seen = cancel(base, late)
        assert seen["deadline_met"] is False and seen["first_token_at"] is None, seen
        assert deadlines(base, "missed") == 1

        wait_for(lambda: view(base, on_time)["deadline_met"] is True, timeout=20, what="the on-time first token")
        assert cancel(base, on_time)["deadline_met"] is True  # judged at its first token, not again
        assert deadlines(base, "missed") == 1 and deadlines(base, "met") == 1
    finally:
        stack.stop()
