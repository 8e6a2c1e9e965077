"""--stream-interval-ms: a run's tokens after its first go to its log at most once per interval, in one
batch. The first token is never held; the engine's end (or its failure) cuts a hold short, so the
tokens held go with the run's end at once; and each token still lands once and in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from sluicegate.sessions import keys
from sluicegate.sessions.runs import RunSpec, RunStore
from sluicegate.settings import Settings
from sluicegate.workers.engines.base import EngineError, Piece
from sluicegate.workers.engines.sim import SimEngine, prompt_seed, sim_text, sim_token
from sluicegate.workers.runner import Run
from tests.helpers import Stack, fast_settings, sse, submit
from tests.test_run_tail import PROMPT, next_message, one_run
from tests.worker_helpers import token_indices, token_text


def recording_appends(worker: RunStore) -> list[tuple[float, int, int]]:
    """(time.monotonic() at the call, first index, tokens) of each append the run makes."""
    calls: list[tuple[float, int, int]] = []
    append = worker.append

    async def recorded(rid: str, attempt: str, first_index: int, data: list[str], *args: Any) -> Any:
        calls.append((time.monotonic(), first_index, len(data)))
        return await append(rid, attempt, first_index, data, *args)

    worker.append = recorded  # type: ignore[method-assign]
    return calls


class BurstWhileHeld:
    """An engine that streams its first sim token, pauses (the writer appends it, then holds), streams
    `count - 1` more at once, and `then` seconds later ends, or fails (`fail`)."""

    def __init__(self, count: int, *, then: float, fail: bool = False) -> None:
        self.count, self.then, self.fail = count, then, fail
        self.ended_at = 0.0

    async def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[Piece]:
        seed = prompt_seed(PROMPT)
        yield sim_token(seed, 0)
        await asyncio.sleep(0.3)
        for i in range(1, self.count):
            yield sim_token(seed, i)
        await asyncio.sleep(self.then)
        self.ended_at = time.monotonic()
        if self.fail:
            raise EngineError("the backend went away", transient=True)

    async def aclose(self) -> None:
        pass


def test_tokens_after_the_first_leave_once_per_interval(redis_url: str, r: redis.Redis) -> None:
    interval = 0.25
    with one_run(redis_url, "interval-1", 40) as (stack, run, worker, rid, spec):
        appends = recording_appends(worker)
        engine = SimEngine(tokens_per_second=100, prefill_ms=0)  # 40 tokens over 0.4 s
        began = time.monotonic()
        outcome = run(Run(worker, engine, spec, interval=interval).execute())
        took = time.monotonic() - began
        assert outcome.kind == "done"
        assert appends[0][1:] == (0, 1), "the first token leaves alone, at once"
        assert len(appends) <= 1 + took / interval, f"a batch per {interval} s at most: {appends}"
        gaps = [b[0] - a[0] for a, b in zip(appends, appends[1:], strict=False)]
        assert all(gap >= interval * 0.95 for gap in gaps), gaps
        assert outcome.tail is not None and outcome.tail.first_index == sum(n for _, _, n in appends)
        assert run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=outcome.tail))
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=10))
        assert token_indices(events) == list(range(40)) and token_text(events) == sim_text(PROMPT, 40)


def test_the_engines_end_cuts_the_hold_short_and_the_end_carries_the_rest(redis_url: str, r: redis.Redis) -> None:
    with one_run(redis_url, "interval-2", 6) as (stack, run, worker, rid, spec):
        appends = recording_appends(worker)
        began = time.monotonic()
        outcome = run(Run(worker, SimEngine(tokens_per_second=200, prefill_ms=0), spec, interval=30).execute())
        assert time.monotonic() - began < 10, "the run waited for its interval after the engine had ended"
        assert outcome.kind == "done" and [a[1:] for a in appends] == [(0, 1)]
        assert outcome.tail is not None and outcome.tail.first_index == 1 and len(outcome.tail.data) == 5
        assert run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=outcome.tail))
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=10))
        assert token_indices(events) == list(range(6)) and token_text(events) == sim_text(PROMPT, 6)


def test_an_engine_failure_during_a_hold_still_writes_every_token_it_produced(redis_url: str,
                                                                              r: redis.Redis) -> None:
    with one_run(redis_url, "interval-3", 8) as (_stack, run, worker, rid, spec):
        began = time.monotonic()
        appends = recording_appends(worker)
        outcome = run(Run(worker, BurstWhileHeld(5, then=0.1, fail=True), spec, interval=30).execute())
        assert time.monotonic() - began < 10, "the run waited for its interval after the engine had failed"
        assert outcome.kind == "engine_error" and outcome.transient
        assert [a[1:] for a in appends] == [(0, 1), (1, 4)]
        assert r.hget(keys.request(rid), "n") == "5", "the tokens held are in the log: a resume continues after them"


def test_a_full_batch_ends_a_hold_so_no_token_waits_out_the_interval_behind_it(redis_url: str,
                                                                               r: redis.Redis) -> None:
    """An append carries at most MAX_BATCH (256) tokens: were a hold kept while more than that waited,
    the delay would grow by an interval per batch. A full batch leaves at once, then the next."""
    with one_run(redis_url, "interval-4", 600) as (stack, run, worker, rid, spec):
        appends = recording_appends(worker)
        engine = BurstWhileHeld(600, then=1.5)
        outcome = run(Run(worker, engine, spec, interval=30).execute())
        assert outcome.kind == "done"
        assert [a[1:] for a in appends] == [(0, 1), (1, 256), (257, 256)]
        assert all(at < engine.ended_at for at, _, _ in appends), "full batches waited for the engine's end"
        assert outcome.tail is not None and outcome.tail.first_index == 513 and len(outcome.tail.data) == 87
        assert run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=outcome.tail))
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=10))
        assert token_indices(events) == list(range(600)) and token_text(events) == sim_text(PROMPT, 600)


def test_a_worker_holds_its_runs_tokens_for_the_interval_its_settings_give(redis_url: str, r: redis.Redis) -> None:
    """The setting's way from the flag to the run (ms to seconds): a 30-token answer at 100 tokens/s
    reaches the session's channel in a few batches, not one per token."""
    stack = Stack(fast_settings(redis_url, stream_interval_ms=150, sim_tokens_per_second=100)).start(workers=1)
    try:
        pubsub = r.pubsub()
        pubsub.ssubscribe(keys.session_channel("interval-5"))
        assert (next_message(pubsub, 5) or {}).get("type") == "ssubscribe"
        rid = submit(stack.base_url, "interval-5", prompt=PROMPT, max_tokens=30)
        with_tokens = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            message = next_message(pubsub, 1)
            if message is None or message["type"] != "smessage":
                continue
            names = [line.split("|")[1] for line in message["data"].split("\n")]
            with_tokens += "token" in names
            if "done" in names:
                break
        pubsub.close()
        assert 2 <= with_tokens <= 4, f"{with_tokens} batches of tokens: the interval did not reach the run"
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=10))
        assert token_indices(events) == list(range(30)) and token_text(events) == sim_text(PROMPT, 30)
    finally:
        stack.stop()


def test_the_interval_is_checked_before_any_process_starts() -> None:
    assert Settings(stream_interval_ms=20).stream_interval_ms == 20
    for bad in (-1, 5000, float("nan")):
        with pytest.raises(ValidationError):
            Settings(stream_interval_ms=bad)
