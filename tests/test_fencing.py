"""Fencing: a worker that lost a run (its lease lapsed while it was paused, or it was preempted)
cannot write into a stream it no longer owns. Writes carry the attempt number; `append` rejects an
old attempt with {0, status} and a wrong start index with {-1, expected index}."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.registry import register_group
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.runs import Assignment
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import Transitions, run_sync
from sluicegate.workers.engines.sim import SimEngine, prompt_seed, sim_text, sim_token
from sluicegate.workers.runner import Run, token_data
from tests.helpers import call, sse, submit
from tests.sched_harness import _Sync
from tests.worker_helpers import (
    Listener,
    api_and_two_played_workers,
    assert_tickets_balanced,
    stream_on_one_of_two_workers,
    token_indices,
    token_text,
)


def test_append_rejects_an_old_attempt_and_a_wrong_index(redis_url: str, r: redis.Redis) -> None:
    """The scripts directly, with the test playing two workers: a zombie that lost its run and the
    survivor that resumed it."""
    prompt = "fenced in"
    seed = prompt_seed(prompt)
    with api_and_two_played_workers(redis_url, "default.zombie.1.aaaaaa", "default.survivor.2.bbbbbb") as (
            stack, run, zombie, survivor):
        transitions = zombie.transitions
        run(zombie.set_free_slots(1))
        rid = submit(stack.base_url, "fence", prompt=prompt, max_tokens=6)
        assignment = run(zombie.next_assignment(timeout=5))
        assert assignment.key == f"{rid}|1"
        spec = run(zombie.spec(assignment))
        assert spec is not None and spec.start_index == 0

        def owner() -> list[str | None]:
            return r.hmget(keys.request(rid), "st", "a", "w")

        assert owner() == ["running", "1", zombie.worker_id]

        def tok(i: int) -> str:
            return token_data(rid, i, sim_token(seed, i))

        def append(attempt: str, first: int, *indices: int) -> object:
            reply = run(transitions.append(rid, attempt, first, [tok(i) for i in indices]))
            return [x.decode() if isinstance(x, bytes) else int(x) for x in reply]

        def produced() -> int:
            return int(r.hget(keys.request(rid), "n"))

        assert run(zombie.append(rid, "1", 0, [tok(0), tok(1)])).ok
        assert append("1", 5, 5) == [-1, 2]  # a gap
        assert append("1", 1, 1) == [-1, 2]  # an overlap
        # the zombie's own batch resent after a lost reply is recognised, not written twice
        assert run(zombie.append(rid, "1", 0, [tok(0), tok(1)])).ok
        assert produced() == 2

        # the zombie's lease lapses (it was paused); the sweep requeues the run onto the survivor
        run(survivor.set_free_slots(1))
        r.zadd(keys.group_key("default", "leases"), {f"{rid}|1": 0})
        r.delete(keys.worker("default", zombie.worker_id))  # paused: not heard from for its lease
        run(transitions.sweep("default"))
        taken = run(survivor.next_assignment(timeout=5))
        assert taken.key == f"{rid}|2"
        assert run(survivor.spec(taken)) is not None  # the survivor's run starts (on a cluster: on the data plane)

        assert append("1", 2, 2) == [0, "running"]  # fenced: attempt 2 owns the run now
        assert append("0", 2, 2) == [0, "running"]
        # the zombie's run, waking up mid-generation, is fenced at its first write: nothing lands
        zombie_run = Run(zombie, SimEngine(tokens_per_second=1000, prefill_ms=0), spec)
        zombie_run.next_index = 2
        outcome = run(zombie_run.execute())
        assert outcome.kind == "fenced" and outcome.detail == "running", outcome
        assert produced() == 2
        assert owner() == ["running", "2", survivor.worker_id]  # the zombie no longer owns the run

        assert run(survivor.append(rid, "2", 2, [tok(i) for i in range(2, 6)])).ok
        assert run(survivor.finish(rid, "2", outcome="done", detail="length", return_slot=True))
        # the zombie's late finish only releases its slot: no second `done`, and repeating it
        # (a retry after a lost reply) does not return a second ticket
        assert not run(zombie.finish(rid, "1", outcome="done", detail="length", return_slot=True))
        assert not run(zombie.finish(rid, "1", outcome="done", detail="length", return_slot=True))
        assert int(r.hget(keys.data_metrics(keys.bucket_of_request(rid)), "fenced|default")) >= 3

        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=10))
        assert [e.event for e in events].count("done") == 1 and events[-1].event == "done"
        assert [(e.event, e.data.get("reason")) for e in events if e.event == "preempted"] == [
            ("preempted", "worker_lost")]
        assert token_indices(events) == list(range(6))
        assert token_text(events) == sim_text(prompt, 6)
        # the sweep retired the zombie (its liveness went with its lease), so its late release
        # returns no ticket: it offers its slots again when its next heartbeat tells it it lapsed
        assert r.lrange(keys.group_key("default", "idle"), 0, -1) == ["default.survivor.2.bbbbbb"]
        assert r.exists(keys.worker("default", "default.zombie.1.aaaaaa")) == 0


def test_the_first_tokens_engine_times_are_kept_once_and_only_when_well_formed(redis_url: str,
                                                                               r: redis.Redis) -> None:
    """An attempt's first append may carry its worker's engine times (took the run, called, first token): the request
    keeps them with its first token, and no later batch (nor a resumed attempt, which finds the first
    token written) overwrites them; a malformed value is ignored, and the request still reads."""
    with api_and_two_played_workers(redis_url, "default.timed.1.aaaaaa", "default.other.2.bbbbbb") as (
            stack, run, worker, _):
        run(worker.set_free_slots(1))

        def started(session: str) -> str:
            rid = submit(stack.base_url, session, prompt="timed", max_tokens=6)
            assert run(worker.spec(run(worker.next_assignment(timeout=5)))) is not None
            return rid

        def times(rid: str) -> list[str | None]:
            return r.hmget(keys.request(rid), "et", "ec", "ef")

        rid = started("times")
        kept = ["1700000000122.750", "1700000000123.500", "1700000000125.250"]
        assert run(worker.append(rid, "1", 0, [token_data(rid, 0, "a")],
                                 (1700000000122.75, 1700000000123.5, 1700000000125.25))).ok
        assert times(rid) == kept
        assert run(worker.append(rid, "1", 1, [token_data(rid, 1, "b")], (1.0, 2.0, 3.0))).ok
        assert times(rid) == kept  # the first token's, kept
        assert run(worker.finish(rid, "1", outcome="done", detail="stop", return_slot=True))

        bad = started("malformed")
        reply = run(worker.transitions.scripts.call("append", [keys.request_prefix(bad)],
                                                    [bad, "1", 0, "1.2.3|.", token_data(bad, 0, "a")]))
        assert int(reply[0]) == 1 and times(bad) == [None, None, None]
        code, view = call("GET", f"{stack.base_url}/v1/requests/{bad}")
        assert code == 200 and view["backend_called_at"] is None and view["worker_took_at"] is None
        assert view["first_token_at"] is not None


def test_a_paused_worker_wakes_up_fenced(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    """SIGSTOP a worker mid-stream until its lease lapses and the run resumes on the other worker,
    then SIGCONT it: nothing it writes lands (no index twice, one `done`), and it re-offers its
    slots (dispatch dropped its tickets while it was gone), so the ledger balances with both alive."""
    prompt = "sleeping beauty"
    with stream_on_one_of_two_workers(redis_url, r, tmp_path, session="zombie", prompt=prompt, max_tokens=250,
                                      past_index=30) as run:
        stack, rid, listener, zombie, survivor_id = run.stack, run.rid, run.listener, run.running_on, run.other_id
        zombie.signal(signal.SIGSTOP)
        try:
            resumed, _ = listener.first(lambda e: e.event == "resumed", timeout=30)
            assert resumed.data["worker"] == survivor_id
            listener.first(lambda e: e.event == "token" and e.data["index"] >= resumed.data["index"] + 20)
        finally:
            zombie.signal(signal.SIGCONT)
        events = listener.join(60)

        assert token_indices(events) == list(range(250)), "the zombie's late write landed"
        assert token_text(events) == sim_text(prompt, 250)
        assert [e.event for e in events].count("done") == 1 and events[-1].event == "done"
        assert [e.data["reason"] for e in events if e.event == "preempted"] == ["worker_lost"]
        assert call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["tokens"] == 250

        assert_tickets_balanced(r, expected_slots=4)  # the zombie is back with both its slots
        assert zombie.proc.poll() is None and "had lapsed" in zombie.log_text()
        fenced = int(r.hget(keys.data_metrics(keys.bucket_of_request(rid)), "fenced|default") or 0)
        print(f"\nlate writes fenced: {fenced} (0 when the control notice stopped the run before its next write)")
        # and the zombie serves again
        more = [submit(stack.base_url, f"again{i}", max_tokens=60) for i in range(4)]
        ran_on = set()
        for m in more:
            tail = Listener(stack.base_url, m).join(30)
            assert tail[-1].event == "done" and token_indices(tail) == list(range(60))
            ran_on.update(e.data["worker"] for e in tail if e.event == "started")
        assert ran_on == set(run.workers)
        assert_tickets_balanced(r, expected_slots=4)


@pytest.mark.single_server  # drives the one-server functions directly (the ticket rule is shared: runs.lua)
def test_a_replayed_release_of_an_older_attempt_returns_no_second_ticket(r: redis.Redis) -> None:
    """Attempts are not released in order: A's release of attempt 1 (reply lost, so retried) may come
    after B finished attempt 2. The retry must not put A's ticket back a second time."""
    t = Transitions(Scripts(r), lease_ms=30_000, session_ttl=60)
    idle = keys.group_key("default", "idle")
    low, high = keys.bucket_of_session("s-low") + "low", keys.bucket_of_session("s-high") + "high"

    def offer(wid: str) -> None:
        run_sync(t.register_worker("default", wid, free=1, total=1))

    def submit_direct(rid: str, sid: str, priority: int) -> None:
        req = NewRequest(session_id=sid, max_tokens=4, priority=priority, tenant="t", group="default",
                         prompt="p", request_id=rid)
        assert run_sync(t.submit(req))[0] == "ok"

    def finish(rid: str, attempt: int, wid: str) -> bool:
        return run_sync(t.finish(rid, str(attempt), wid=wid, group="default", outcome="done", detail="length",
                                 return_slot=True))

    def popped(wid: str) -> str:
        return Assignment.parse(r.lpop(keys.worker_inbox("default", wid))).key

    r.hset(keys.POLICY, mapping={"min_run": 0})
    run_sync(register_group(_Sync(r), "default"))
    r.hset(keys.group_key("default", "pol"), mapping={"min_run": 0})
    offer("A")
    submit_direct(low, "s-low", 2)
    assert popped("A") == f"{low}|1"
    submit_direct(high, "s-high", 9)  # no free slot: preempts low (attempt 1 on A)
    assert r.hget(keys.request(low), "st") == "preempted"
    assert not finish(low, 1, "A")  # A lets go: its ticket goes to high
    assert popped("A") == f"{high}|1"
    offer("B")
    assert popped("B") == f"{low}|2"
    assert finish(low, 2, "B")  # B finishes attempt 2: its ticket comes back
    assert r.lrange(idle, 0, -1) == ["B"]
    finish(low, 1, "A")  # A's retried release of attempt 1
    assert r.lrange(idle, 0, -1) == ["B"], "A got a second ticket while it still runs `high`"
