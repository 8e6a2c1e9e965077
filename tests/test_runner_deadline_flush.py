"""The store's refusal of an append decides a run whose engine failed while that append was on its way.

A run's first token is on its way to the store when its `"on_deadline_miss": "fail"` deadline passes (the
store decides then), and meanwhile the engine fails, transiently. The run waits for that append (it keeps
what the engine produced), and the store refuses it, past the deadline: the request ends failed with
`deadline_exceeded` (CONTRACT.md), not handed back as a backend error (a `preempted` event, an attempt
counted, a `resumed` one, or on its last attempt a message that no longer says `deadline_exceeded`). So
does a run that lost its request meanwhile (fenced). The same holds when the writer's refusal and the
engine's failure are both in by the time the run looks: the refusal wins, whatever order it sees them in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from sluicegate.sessions import keys
from sluicegate.sessions.runs import RunSpec, RunStore
from sluicegate.workers.engines.base import EngineError, Piece
from sluicegate.workers.engines.sim import prompt_seed, sim_token
from sluicegate.workers.runner import Run
from tests.helpers import Stack, call, fast_settings, sse, submit
from tests.worker_helpers import api_and_two_played_workers

PROMPT = "the refusal wins"
DEADLINE_MS = 400
LATE = 0.7  # s the first append waits before it leaves: it lands past DEADLINE_MS


class OneTokenThenFail:
    """An engine that yields one token, then its backend fails (transiently) once `fail` is set: at once
    when no one gives it an event."""

    def __init__(self, fail: Callable[[], asyncio.Event] | None = None) -> None:
        self.fail = fail

    async def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[Piece]:
        yield sim_token(prompt_seed(PROMPT), 0)
        if self.fail is None:
            await asyncio.sleep(0.1)  # the first append is on its way
        else:
            await self.fail().wait()
        raise EngineError("the backend went away", transient=True)

    async def aclose(self) -> None:
        return None


def late_first_append(store: RunStore, before: Callable[[], Any] | None = None,
                      after: Callable[[], None] | None = None) -> None:
    """The store's first append of a run leaves LATE s late (past DEADLINE_MS); `before` runs (awaited when a
    coroutine) as it leaves, `after` when its answer is in."""
    real_append = store.append

    async def append(rid: str, attempt: str, first_index: int, *args: Any, **kwargs: Any) -> Any:
        if first_index == 0:
            await asyncio.sleep(LATE)
            if before is not None:
                await asyncio.to_thread(before)
        result = await real_append(rid, attempt, first_index, *args, **kwargs)
        if after is not None:
            after()
        return result

    store.append = append  # type: ignore[method-assign]


def test_a_first_token_refused_past_its_deadline_while_the_engine_fails_ends_the_request_failed(
        redis_url: str) -> None:
    """A real worker: the request ends with `deadline_exceeded` at once, and no attempt is counted."""
    stack = Stack(fast_settings(redis_url, slots=1)).start(scheduler=False, workers=0)
    try:
        base = stack.base_url
        wid = stack.add_worker(engine=OneTokenThenFail())  # type: ignore[arg-type]
        late_first_append(stack.workers[wid].store)
        rid = submit(base, "dlf-worker", prompt=PROMPT, max_tokens=5, deadline_ms=DEADLINE_MS,
                     on_deadline_miss="fail")
        events = list(sse(base, f"/v1/requests/{rid}/events", timeout=15))
        assert [e.event for e in events] == ["queued", "started", "error"], events
        assert events[-1].data["message"].startswith("deadline_exceeded"), events[-1]
        view = call("GET", f"{base}/v1/requests/{rid}")[1]
        assert view["status"] == "failed" and view["failed_attempts"] == 0 and view["tokens"] == 0, view
        assert view["deadline_met"] is False, view
    finally:
        stack.stop()


@contextmanager
def played(redis_url: str) -> Iterator[tuple[Stack, Callable[..., Any], RunStore]]:
    with api_and_two_played_workers(redis_url, "default.dlf.1.aaaaaa", "default.other.2.bbbbbb") as (
            stack, run, worker, _):
        run(worker.set_free_slots(1))
        yield stack, run, worker


def started(stack: Stack, run: Callable[..., Any], worker: RunStore, session: str, **body: Any
            ) -> tuple[str, RunSpec]:
    """A request of `session` (`body`: more of its fields), started by the played worker."""
    rid = submit(stack.base_url, session, prompt=PROMPT, max_tokens=5, **body)
    spec = run(worker.spec(run(worker.next_assignment(timeout=5))))
    assert spec is not None
    return rid, spec


def test_the_refusal_wins_when_it_and_the_engine_failure_are_both_in(redis_url: str, r: redis.Redis) -> None:
    """The engine fails as the store's refusal comes back, so the run finds both its writer and its engine
    call ended, each with its error. Several runs, so that both orders a set can give them in come up."""
    with played(redis_url) as (stack, run, worker):
        refused = asyncio.Event()
        late_first_append(worker, after=refused.set)
        for i in range(6):
            rid, spec = started(stack, run, worker, f"dlf-both-{i}", deadline_ms=DEADLINE_MS,
                                on_deadline_miss="fail")
            assert spec.deadline_left_ms is not None
            refused.clear()
            outcome = run(Run(worker, OneTokenThenFail(lambda: refused), spec).execute())  # type: ignore[arg-type]
            assert (outcome.kind, outcome.transient) == ("deadline_exceeded", False), (i, outcome)
            run(worker.finish(rid, spec.attempt, outcome="failed", detail=outcome.detail, return_slot=True))
            status, failed_attempts = r.hmget(keys.request(rid), "st", "fl")
            assert (status, int(failed_attempts or 0)) == ("failed", 0)


def test_a_run_fenced_while_its_engine_fails_ends_fenced(redis_url: str) -> None:
    """The request is cancelled while the run's first append is on its way and its engine fails: the append is
    refused (the run lost its request), and that is the run's outcome, not the engine's error."""
    with played(redis_url) as (stack, run, worker):
        rids: list[str] = []

        def cancel() -> None:
            assert call("DELETE", f"{stack.base_url}/v1/requests/{rids[0]}")[0] == 200

        late_first_append(worker, before=cancel)
        rid, spec = started(stack, run, worker, "dlf-fenced")
        rids.append(rid)
        outcome = run(Run(worker, OneTokenThenFail(), spec).execute())  # type: ignore[arg-type]
        assert outcome.kind == "fenced", outcome
