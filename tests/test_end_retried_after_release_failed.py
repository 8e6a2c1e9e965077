"""A run's end on a cluster is a data step, then the release on the control plane, then the session's next
head readied. When the release fails (the control master failing over) the worker retries the whole end:
the retried data step was refused (the request is done already), so its reply carried no backend prompt
count and no next head. The tenant kept the estimate's charge, and the session's next request waited for the
repair pass. A retry now takes up from the step that failed (the caller's EndProgress). The cluster
protocol (one call per plane), on one server and on the cluster in its pass."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from sluicegate.sessions.transitions import EndProgress
from sluicegate.workers.redis_retry import through_dropped_connections
from tests.sched_harness import Harness


@pytest.mark.parametrize("failing", ["release", "ready"])
def test_an_end_retried_after_a_control_step_failed_ends_as_the_first_try_would(
        r: redis.Redis, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    h = Harness(r, lease_ms=60_000, cluster=True)
    h.add_worker("w0", slots=1)
    first = h.submit("s", max_tokens=4, prompt="x" * 400)  # its input estimated at 100 tokens
    second = h.submit("s", max_tokens=4, tenant="u")
    run = h.run_of(first)
    h.append(run, 4)
    h.runs.remove(run)
    call, failed = h.scripts.call, []

    def failing_once(name: str, keys_: Any, args: Any) -> Any:
        if name == failing and not failed:
            failed.append(name)
            raise redis.exceptions.ConnectionError("Connection reset by peer (the control master failing over)")
        return call(name, keys_, args)

    monkeypatch.setattr(h.scripts, "call", failing_once)

    progress = EndProgress()  # as the worker's _end keeps it across its retries

    async def end() -> None:
        await h.t.finish(first, run.attempt, wid="w0", group="default", outcome="done", detail="stop",
                         return_slot=True, usage={"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
                         progress=progress)

    asyncio.run(through_dropped_connections(end, seconds=5, what="finish"))
    assert failed == [failing]
    h.collect()
    assert (h.status(first), h.status(second)) == ("done", "running")  # [second queued: left to the repair]
    assert h.vtc("t") == pytest.approx(13.0)  # charged at the backend's 5 prompt tokens [108.0: the estimate]
