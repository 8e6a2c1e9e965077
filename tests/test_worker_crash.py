"""Liveness: a worker that dies (kill -9) or loses its Redis connections loses nothing.

After kill -9 mid-stream, the run's lease lapses, the scheduler's sweep requeues it (`preempted`,
reason worker_lost) and it resumes on the surviving worker from the tokens so far: the client sees
every token index once and the very text an uninterrupted run produces. The dead worker's slot
tickets are reaped, so the ledger balances again.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import redis

from sluicegate.sessions import keys
from sluicegate.sessions.runs import RunStore
from sluicegate.workers.engines.sim import sim_text
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, sse, submit, wait_for
from tests.worker_helpers import (
    Listener,
    api_and_two_played_workers,
    assert_tickets_balanced,
    idle_tickets,
    on_loop,
    stream_on_one_of_two_workers,
    token_indices,
    token_text,
)


def test_kill_9_mid_stream_resumes_on_the_other_worker(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    prompt = "what the river keeps"
    with stream_on_one_of_two_workers(redis_url, r, tmp_path, session="crash", prompt=prompt, max_tokens=300,
                                      past_index=40) as run:
        stack, rid, listener, victim, survivor_id = run.stack, run.rid, run.listener, run.running_on, run.other_id
        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert victim.wait(10) == -signal.SIGKILL
        resumed, resumed_at = listener.first(lambda e: e.event == "resumed", timeout=30)
        events = listener.join(60)
        print(f"\ndead worker to resumed generation: {resumed_at - killed_at:.2f} s (lease 1.5 s)")
        assert resumed_at - killed_at < 10

        preempted = [e for e in events if e.event == "preempted"]
        assert len(preempted) == 1 and preempted[0].data["reason"] == "worker_lost", preempted
        assert resumed.data["worker"] == survivor_id
        assert resumed.data["index"] == preempted[0].data["index"] >= 40
        assert token_indices(events) == list(range(300)), "a token index is missing or doubled"
        assert token_text(events) == sim_text(prompt, 300)
        assert events[-1].event == "done" and events[-1].data["tokens"] == 300
        assert [e.id for e in events] == sorted({e.id for e in events})
        view = call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]
        assert view["status"] == "done" and view["tokens"] == 300

        # the dead worker's tickets and inbox are reaped by the survivor's heartbeats
        assert_tickets_balanced(r, expected_slots=2)
        assert r.exists(keys.worker_inbox("default", victim.worker_id)) == 0
        # and the survivor still serves: a new request runs to the end on it
        more = submit(stack.base_url, "after", max_tokens=20)
        tail = Listener(stack.base_url, more).join(30)
        assert tail[-1].event == "done" and token_indices(tail) == list(range(20))
        assert [e.data["worker"] for e in tail if e.event == "started"] == [survivor_id]


def _kill_connections(r: redis.Redis, name: str) -> int:
    """Drop every connection a client opened under `name` (its BRPOP, pubsub and pool connections)."""
    killed = 0
    for client in r.client_list():
        if client.get("name") == name:
            killed += r.client_kill_filter(_id=client["id"])
    return killed


def test_worker_survives_its_connections_dropping(redis_url: str, r: redis.Redis) -> None:
    """Kill all of a worker's Redis connections mid-stream (twice): the run completes gap-free, the
    control channel comes back (a cancel still interrupts at once) and no slot ticket is lost."""
    stack = Stack(fast_settings(redis_url, sim_tokens_per_second=100.0, slots=2)).start(workers=1)
    try:
        (wid,) = stack.workers
        name = f"sluicegate-worker:{wid}"
        rid = submit(stack.base_url, "blip", prompt="blip", max_tokens=150)
        listener = Listener(stack.base_url, rid)
        listener.first(lambda e: e.event == "token" and e.data["index"] >= 20)
        assert _kill_connections(r, name) >= 2  # at least the inbox BRPOP and the control subscription
        listener.first(lambda e: e.event == "token" and e.data["index"] >= 60)
        assert _kill_connections(r, name) >= 2
        events = listener.join(30)
        assert events[-1].event == "done", events[-3:]
        assert token_indices(events) == list(range(150))
        assert token_text(events) == sim_text("blip", 150)

        wait_for(lambda: r.pubsub_shardnumsub(keys.worker_control("default", wid))[0][1] == 1,
                 what="the control channel to resubscribe")
        long_rid = submit(stack.base_url, "blip2", prompt="long", max_tokens=5000)
        wait_for(lambda: call("GET", f"{stack.base_url}/v1/requests/{long_rid}")[1]["tokens"] > 3,
                 what="the long run")
        assert call("DELETE", f"{stack.base_url}/v1/requests/{long_rid}")[0] == 200
        worker = stack.workers[wid]
        wait_for(lambda: not worker.runs, timeout=5, what="the worker to drop the cancelled run")
        assert_tickets_balanced(r, expected_slots=2)
    finally:
        stack.stop()


def test_tickets_of_a_vanished_worker_are_reaped(redis_url: str, r: redis.Redis) -> None:
    """A worker that dies idle has no run whose lease could lapse, yet its tickets (and a stray
    inbox) must not outlive it: the live workers' heartbeats reap them once its liveness lapses."""
    stack = Stack(fast_settings(redis_url, slots=2)).start(api=False, workers=1)
    run = on_loop(stack)
    ghost = "default.ghost.1.000000"
    store = RunStore.connect(redis_url, worker_id=ghost, group="default", lease_seconds=1.0, session_ttl=60,
                             cluster=ON_CLUSTER)
    try:
        run(store.set_free_slots(3))
        r.rpush(keys.worker_inbox("default", ghost), "nothing|1")
        assert idle_tickets(r)[ghost] == 3
        assert_tickets_balanced(r, expected_slots=2)
        assert r.exists(keys.worker_inbox("default", ghost)) == 0
        assert not r.hexists(keys.group_key("default", "workers"), ghost)
    finally:
        run(store.aclose())
        stack.stop()


def test_a_lapsed_lease_retires_its_worker_before_the_run_is_dispatched_again(redis_url: str,
                                                                               r: redis.Redis) -> None:
    """kill -9 right after a heartbeat: the run's lease and the worker's liveness key lapse at the
    same moment, and the key can outlive the lease by a hair. The sweep that requeues the run must
    not hand it back to the dead worker through the idle ticket of its other slot (CI saw the run
    resumed on the dead worker, then lost a second time). Here the liveness key outlives the lease
    by a lot: the run must still go to the other worker, and the lapsed one must rejoin first."""
    with api_and_two_played_workers(redis_url, "default.lapsed.1.aaaaaa", "default.other.2.bbbbbb") as (
            stack, run, lapsed, other):
        run(lapsed.set_free_slots(2))
        rid = submit(stack.base_url, "lapse", max_tokens=5)
        first = run(lapsed.next_assignment(timeout=5))
        assert first.key == f"{rid}|1"
        run(other.set_free_slots(1))  # the lapsed worker's spare ticket is the older one: dispatch takes it first
        r.zadd(keys.group_key("default", "leases"), {f"{rid}|1": 0})
        # its last beat a lease ago (killed right after it), its liveness key not yet expired
        r.set(keys.worker("default", lapsed.worker_id), 1, px=60_000)
        run(other.transitions.sweep("default"))

        resumed = run(other.next_assignment(timeout=5))
        assert resumed is not None and resumed.key == f"{rid}|2", "the run went back to the lapsed worker"
        assert r.exists(keys.worker("default", lapsed.worker_id)) == 0
        assert lapsed.worker_id not in idle_tickets(r)
        # were it only paused, its next heartbeat tells it so: it rejoins and drops the lost run
        rejoin, lost = run(lapsed.heartbeat([first.key]))
        assert rejoin and lost == [first.key]
        # that reply lost on the way, the next heartbeat says it again, until the worker offers its slots
        assert run(lapsed.heartbeat([])) == (True, [])
        run(lapsed.set_free_slots(2, 2))
        assert run(lapsed.heartbeat([])) == (False, [])
        assert idle_tickets(r)[lapsed.worker_id] == 2


def test_a_lapsed_lease_of_a_worker_still_beating_is_requeued_without_counting_a_failure(
        redis_url: str, r: redis.Redis) -> None:
    """The assignment waited in the inbox of a worker whose event loop is busy (it beats, but has not
    started the run, so its beats do not renew it): the run is requeued, the worker keeps its slots,
    and the stop is no failed attempt (--max-attempts counts lost workers and backend failures only)."""
    with api_and_two_played_workers(redis_url, "default.slow.1.aaaaaa", "default.other.2.bbbbbb") as (
            stack, run, slow, other):
        run(slow.set_free_slots(2))
        rid = submit(stack.base_url, "slow", max_tokens=5)
        first = run(slow.next_assignment(timeout=5))
        assert first.key == f"{rid}|1"
        r.zadd(keys.group_key("default", "leases"), {f"{rid}|1": 0})
        run(slow.heartbeat([]))  # beating, without the run
        run(other.transitions.sweep("default"))
        assert r.hget(keys.request(rid), "fl") in (None, "0")
        assert r.exists(keys.worker("default", slow.worker_id)) == 1
        if ON_CLUSTER:  # its assignment never started: popped late from the inbox, its start is refused
            assert run(slow.spec(first)) is None
        resumed = run(slow.next_assignment(timeout=5)) or run(other.next_assignment(timeout=5))
        assert resumed is not None and resumed.key == f"{rid}|2"
        if not ON_CLUSTER:  # one server starts a run at its dispatch; a played worker on a cluster never did
            events = [e.event for e in sse(stack.base_url, f"/v1/requests/{rid}/events", stop_after=3, timeout=10)]
            assert events == ["queued", "started", "preempted"]


def test_an_assignment_lost_with_an_inbox_reply_leaves_no_ticket_behind(redis_url: str, r: redis.Redis) -> None:
    """An inbox read pops an assignment and its reply is lost (the connection broke): the worker never
    sees the run, and resyncs its slots. The ticket that attempt took must go with it, or the group's
    slot count (`tk`, which the fair-share headroom reads) keeps one slot too many for as long as the
    worker lives. The lapsed attempt then runs again, holding a ticket of its own."""
    with api_and_two_played_workers(redis_url, "default.lossy.1.aaaaaa", "default.other.2.bbbbbb") as (
            stack, run, lossy, other):
        held = keys.group_key("default", "tk")
        run(lossy.set_free_slots(2))
        rid = submit(stack.base_url, "lost-reply", max_tokens=5)
        assert r.rpop(keys.worker_inbox("default", lossy.worker_id)) is not None  # popped; the reply never came
        assert r.hgetall(held) == {f"{rid}|1": lossy.worker_id}
        run(lossy.set_free_slots(2, 2, held=[]))  # the inbox loop's resync after the failed read
        assert r.hgetall(held) == {}, "the lost attempt still counts as a held slot"
        assert idle_tickets(r)[lossy.worker_id] == 2
        r.zadd(keys.group_key("default", "leases"), {f"{rid}|1": 0})
        run(lossy.heartbeat([]))  # beating, without the run
        run(other.transitions.sweep("default"))
        resumed = run(lossy.next_assignment(timeout=5))
        assert resumed is not None and resumed.key == f"{rid}|2"
        assert r.hgetall(held) == {resumed.key: lossy.worker_id}
        assert idle_tickets(r)[lossy.worker_id] == 1


def test_started_events_name_the_worker_by_an_id_that_names_no_host_or_process(stack: Stack) -> None:
    """Tenants read `started`: it names the worker by an opaque id; operators see host and pid in stats."""
    import os
    import socket

    rid = submit(stack.base_url, "who", max_tokens=2)
    started = next(e for e in Listener(stack.base_url, rid).join(30) if e.event == "started")
    wid = started.data["worker"]
    assert socket.gethostname() not in wid and str(os.getpid()) not in wid.split(".")
    shown = {w["worker_id"]: w for w in call("GET", f"{stack.base_url}/v1/admin/stats")[1]["workers"]}
    assert shown[wid]["host"] == socket.gethostname() and shown[wid]["pid"] == os.getpid()
