"""A run's last tokens go with its end: the finish appends them, then ends the run, in one call that
publishes one batch (the last tokens and `done`), instead of an append and then the finish. Each token
still lands once and in order: a resent finish adds nothing, a run that lost its request writes nothing,
and a tail that does not start where the log expects ends nothing (the run's lease lapses and the
request resumes from its log)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.runs import DEADLINE_EXCEEDED, RunSpec, RunStore
from sluicegate.sessions.transitions import Tail, run_sync
from sluicegate.workers.engines.sim import SimEngine, prompt_seed, sim_text, sim_token
from sluicegate.workers.runner import Run, token_data
from tests.helpers import Stack, call, sse, submit
from tests.sched_harness import Harness
from tests.worker_helpers import api_and_two_played_workers, token_indices, token_text

PROMPT = "the end carries the rest"


@contextmanager
def one_run(redis_url: str, session: str, max_tokens: int, **body: Any) -> Iterator[
        tuple[Stack, Callable[..., Any], RunStore, str, RunSpec]]:
    """The API, a request of `session` (`body`: more of its fields) and a worker played by the test that has
    started it: (stack, run, worker, request id, run spec)."""
    with api_and_two_played_workers(redis_url, "default.tail.1.aaaaaa", "default.other.2.bbbbbb") as (
            stack, run, worker, _):
        run(worker.set_free_slots(1))
        rid = submit(stack.base_url, session, prompt=PROMPT, max_tokens=max_tokens, **body)
        spec = run(worker.spec(run(worker.next_assignment(timeout=5))))
        assert spec is not None
        yield stack, run, worker, rid, spec


def next_message(pubsub: Any, timeout: float) -> dict[str, Any] | None:
    """The next sharded pub/sub message within `timeout`, or None (a cluster's pubsub ignores its own
    timeout when it is not told the node: it returns at once)."""
    deadline = time.monotonic() + timeout
    while (message := pubsub.get_sharded_message(timeout=0.05)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return message  # type: ignore[no-any-return]


def published(pubsub: Any) -> list[list[str]]:
    """The event batches published since the last call: each a list of "seq|name" of one message."""
    batches = []
    while (message := next_message(pubsub, 0.5)) is not None:
        if message["type"] == "smessage":
            batches.append(["|".join(line.split("|")[:2]) for line in message["data"].split("\n")])
    return batches


def test_the_finish_appends_the_last_tokens_and_ends_in_one_batch(redis_url: str, r: redis.Redis) -> None:
    seed = prompt_seed(PROMPT)
    with one_run(redis_url, "tail-1", 6) as (stack, run, worker, rid, _):
        pubsub = r.pubsub()
        pubsub.ssubscribe(keys.session_channel("tail-1"))
        assert (next_message(pubsub, 5) or {}).get("type") == "ssubscribe"

        def tok(i: int) -> str:
            return token_data(rid, i, sim_token(seed, i))

        def produced() -> int:
            return int(r.hget(keys.request(rid), "n"))

        assert run(worker.append(rid, "1", 0, [tok(0), tok(1)])).ok
        tail = Tail(2, [tok(i) for i in range(2, 6)])
        assert run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=tail))
        assert published(pubsub) == [["3|token", "4|token"],
                                     ["5|token", "6|token", "7|token", "8|token", "9|done"]]
        assert produced() == 6 and r.hget(keys.request(rid), "st") == "done"

        # resent after a lost reply: the end is refused (the request ended), no token lands twice
        assert not run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=tail))
        assert published(pubsub) == [] and produced() == 6
        pubsub.close()

        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=10))
        assert token_indices(events) == list(range(6)) and token_text(events) == sim_text(PROMPT, 6)
        assert [e.event for e in events].count("done") == 1 and events[-1].data["tokens"] == 6


def fenced_writes(base_url: str) -> float:
    """sluicegate_fenced_writes_total over every group, from /metrics."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sluicegate_fenced_writes_total{"))


def test_a_resent_end_counts_no_fenced_write_and_a_lost_runs_end_does(redis_url: str, r: redis.Redis) -> None:
    """The fenced-writes counter is the operators' sign of a worker that lost its run: an end resent after its
    reply was lost (a Redis blip) is no such thing; the end with tokens of a run whose request was cancelled is."""
    seed = prompt_seed(PROMPT)
    with one_run(redis_url, "tail-5", 3) as (stack, run, worker, rid, _):
        tail = Tail(0, [token_data(rid, i, sim_token(seed, i)) for i in range(3)])
        assert run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=tail))
        assert not run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=tail))
        assert fenced_writes(stack.base_url) == 0 and r.hmget(keys.request(rid), "st", "n") == ["done", "3"]

        cancelled = submit(stack.base_url, "tail-5b", prompt=PROMPT, max_tokens=3)
        run(worker.set_free_slots(1))
        assert run(worker.spec(run(worker.next_assignment(timeout=5)))) is not None
        assert call("DELETE", f"{stack.base_url}/v1/requests/{cancelled}")[0] == 200
        late = Tail(0, [token_data(cancelled, i, sim_token(seed, i)) for i in range(3)])
        assert not run(worker.finish(cancelled, "1", outcome="done", detail="length", return_slot=True, tail=late))
        assert fenced_writes(stack.base_url) == 1 and r.hget(keys.request(cancelled), "n") == "0"


@pytest.mark.single_server  # the harness's pinned clock (a global key, which a cluster's functions cannot read)
def test_the_late_end_of_a_worker_the_sweep_declared_lost_counts_a_fenced_write(r: redis.Redis) -> None:
    """A request the sweep failed at --max-attempts (its worker lost) keeps that attempt and worker on its hash,
    as an end that landed does: only a `done` end is taken for a resent one; this late end is a fenced write."""
    h = Harness(r, lease_ms=1000)
    h.t.max_attempts = 1
    h.add_worker("w1", slots=1)
    rid = h.submit("lost", tenant="t", max_tokens=10)
    run = h.run_of(rid)
    h.advance(5000)
    h.sweep()
    assert r.hget(keys.request(rid), "st") == "failed"
    data = [json.dumps({"request_id": rid, "index": i, "text": "t"}) for i in range(3)]
    assert not run_sync(h.t.finish(rid, run.attempt, wid=run.wid, group="default", outcome="done", detail="length",
                                   return_slot=True, tail=Tail(0, data)))
    fenced = r.hget(keys.request_prefix(rid) + "m", "fenced|default")
    assert fenced == "1" and r.hget(keys.request(rid), "n") == "0"


def test_a_tail_that_does_not_start_where_the_log_expects_ends_nothing(redis_url: str, r: redis.Redis) -> None:
    seed = prompt_seed(PROMPT)
    with one_run(redis_url, "tail-2", 4) as (stack, run, worker, rid, _):
        assert run(worker.append(rid, "1", 0, [token_data(rid, 0, sim_token(seed, 0))])).ok
        for first in (3, 0):  # a gap; an overlap that is not this batch resent (that would end at index 1)
            gap = Tail(first, [token_data(rid, i, sim_token(seed, i)) for i in range(first, first + 2)])
            with pytest.raises(redis.ResponseError, match="the log expects 1"):
                run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=gap))
            assert r.hmget(keys.request(rid), "st", "n") == ["running", "1"]
        rest = Tail(1, [token_data(rid, i, sim_token(seed, i)) for i in range(1, 4)])
        assert run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=rest))
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=10))
        assert token_indices(events) == [0, 1, 2, 3] and token_text(events) == sim_text(PROMPT, 4)


def test_an_end_whose_tail_carries_the_first_token_judges_the_request_by_it(redis_url: str, r: redis.Redis) -> None:
    """The end reads the request as the tail's append left it (not read again: append_tail hands its fields on):
    a first token written by the tail, in time, is a met deadline, even when the worker's own clock told it the
    deadline had passed (it ends the run failed `deadline_exceeded`; the store's clock decides)."""
    seed = prompt_seed(PROMPT)
    with one_run(redis_url, "tail-4", 4, deadline_ms=60_000, on_deadline_miss="fail") as (_, run, worker, rid, _):
        tail = Tail(0, [token_data(rid, i, sim_token(seed, i)) for i in range(2)])
        assert run(worker.finish(rid, "1", outcome="failed", detail=DEADLINE_EXCEEDED, return_slot=True, tail=tail))
        stored = r.hgetall(keys.request(rid))
        assert (stored["n"], stored["dmt"], stored["st"]) == ("2", "1", "failed")
        assert stored["err"] == DEADLINE_EXCEEDED, stored["err"]  # not "...: no first token within its deadline"


def test_a_run_whose_engine_ended_before_its_writer_ran_leaves_every_token_to_its_end(redis_url: str,
                                                                                     r: redis.Redis) -> None:
    """An engine that produced its whole answer at once (no pause between tokens): no append at all, and
    the end writes the first token with the engine's times, as a first append would have."""
    with one_run(redis_url, "tail-3", 5) as (stack, run, worker, rid, spec):
        outcome = run(Run(worker, SimEngine(tokens_per_second=0, prefill_ms=0), spec).execute())
        assert outcome.kind == "done" and outcome.tail is not None
        assert outcome.tail.first_index == 0 and len(outcome.tail.data) == 5 and outcome.tail.engine_times
        assert r.hget(keys.request(rid), "n") == "0" and r.hget(keys.request(rid), "ft") is None, "no append"
        assert run(worker.finish(rid, "1", outcome="done", detail="length", return_slot=True, tail=outcome.tail))
        code, view = call("GET", f"{stack.base_url}/v1/requests/{rid}")
        assert code == 200 and view["status"] == "done" and view["tokens"] == 5
        assert view["first_token_at"] is not None and view["backend_called_at"] is not None
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=10))
        assert token_indices(events) == list(range(5)) and token_text(events) == sim_text(PROMPT, 5)


@pytest.mark.parametrize("text", ['plain ', 'say "hi"\\n', "tab\tnew\nline\r", "\x00\x1f\x7f", "é中文 🙂",
                                  "\u2028\u2029", "</script>", ""])
def test_a_token_event_carries_any_text_exactly(text: str) -> None:
    """A token's event data is JSON that gives back its text exactly, whatever characters it holds."""
    data = json.loads(token_data("ab1", 7, text))
    assert data == {"request_id": "ab1", "index": 7, "text": text}
