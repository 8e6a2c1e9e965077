"""Live, on one server and a cluster: a max_concurrency lowered below the runs in flight still lets a waiting
request of a higher class preempt (CONTRACT: a waiting request of higher priority preempts running work of
lower priority in the same group when the group has no free slot). Two priority-2 runs and the cap lowered
to 1: both stop (2 - 1 + 1), and the priority-9 request starts once they let go. The old code stopped none
while the runs were above the cap: the request waited about 6 s, until both low runs ended by themselves."""

from __future__ import annotations

import time

from tests.helpers import Stack, call, submit, wait_for


def status(base: str, rid: str) -> str:
    return str(call("GET", f"{base}/v1/requests/{rid}")[1]["status"])


def wait_of_a_high_request(base: str, cap_after: int) -> tuple[float, list[str]]:
    """Two priority-2 runs under a cap of 2, the cap set to `cap_after`, then a priority-9 request: how long it
    waited to start, and the low requests' statuses then. The low runs take 6 s on the sim (400 tokens/s),
    the high one 1 s."""
    assert call("PUT", f"{base}/v1/admin/groups/default", {"max_concurrency": 2})[0] == 200
    lows = [submit(base, f"l{cap_after}{i}", max_tokens=2400, priority=2, tenant="bulk") for i in range(2)]
    wait_for(lambda: all(status(base, rid) == "running" for rid in lows), what="both low runs")
    assert call("PUT", f"{base}/v1/admin/groups/default", {"max_concurrency": cap_after})[0] == 200
    started = time.monotonic()
    high = submit(base, f"h{cap_after}", max_tokens=400, priority=9, tenant="vip")  # 1 s: the lows stay stopped
    wait_for(lambda: status(base, high) in ("running", "done"), timeout=30, what="the high request's start")
    waited = time.monotonic() - started
    statuses = [status(base, rid) for rid in lows]
    for rid in lows:
        call("DELETE", f"{base}/v1/requests/{rid}")
    wait_for(lambda: all(status(base, rid) in ("cancelled", "done") for rid in lows), what="the low requests' end")
    return waited, statuses


def test_a_cap_lowered_below_the_runs_in_flight_still_preempts_for_a_higher_class(stack: Stack) -> None:
    base = stack.base_url
    at_cap, _ = wait_of_a_high_request(base, 2)  # the cap at the runs in flight: one low run stops
    below, lows = wait_of_a_high_request(base, 1)  # below them: both must stop
    assert at_cap < 1.0, at_cap
    assert below < 1.0, f"the priority-9 request waited {below:.1f} s behind priority-2 runs"
    assert lows == ["preempted", "preempted"], lows
