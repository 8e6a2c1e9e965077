"""The scripts as one function library: loaded on demand, reloaded when the server lost it, and
named by a digest of their source so that two versions never call each other's code."""

from __future__ import annotations

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.library import FUNCTIONS, function_name, library_source
from sluicegate.sessions.registry import register_group
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import Tail, Transitions, run_sync
from tests.helpers import Stack, sse, submit
from tests.metrics_helpers import raw_depths
from tests.sched_harness import _Sync
from tests.test_log_epoch import JUMP
from tests.test_session_log_bound import log_ids, meta


@pytest.mark.single_server  # the one-server functions and one FUNCTION LIST; the cluster reload: test below
def test_a_server_without_the_library_gets_it_on_the_first_call(redis_url: str, r: redis.Redis) -> None:
    r.function_flush()
    scripts = Scripts(redis.Redis.from_url(redis_url))
    nobody = keys.session_prefix("nobody")
    # last id, oldest kept, holes, owner
    assert scripts.call("read_log", [nobody], ["nobody", 0, 10]) == [0, 1, b"", b""]
    [library] = [dict(zip(entry[::2], entry[1::2], strict=True)) for entry in r.function_list()]
    assert library["library_name"] == library_source().split()[1].removeprefix("name=")
    functions = {f[1] for f in library["functions"]}  # ["name", <name>, "description", ...]
    assert function_name("submit") in functions and functions == {function_name(name) for name in FUNCTIONS}
    assert function_name("submit").startswith("sg_") and function_name("submit") != "sg_submit"
    flags = {f[1]: set(f[5]) for f in library["functions"]}  # [..., "flags", [...]]
    assert flags[function_name("read_log")] == {"no-writes"} and flags[function_name("submit")] == set()
    # a reader still reads where writes are refused (as on a replica): FCALL_RO runs only no-writes functions
    assert r.fcall_ro(function_name("read_log"), 1, nobody, scripts.flags, "nobody", 0, 10) == [0, 1, "", ""]


def test_requests_flow_on_after_the_server_loses_the_library(stack: Stack, r: redis.Redis) -> None:
    first = submit(stack.base_url, "lib-1", max_tokens=3)
    assert [e.event for e in sse(stack.base_url, f"/v1/requests/{first}/events")][-1] == "done"
    r.function_flush()  # e.g. a fresh server under the same address: API and worker must reload it
    second = submit(stack.base_url, "lib-2", max_tokens=3)
    events = list(sse(stack.base_url, f"/v1/requests/{second}/events"))
    assert [e.event for e in events if e.event != "token"] == ["queued", "started", "done"]
    assert [e.data["index"] for e in events if e.event == "token"] == [0, 1, 2]


def _transitions(r: redis.Redis) -> Transitions:
    """Direct calls on one server, with one worker "w1" offering a free slot: a submit starts its
    request at once."""
    run_sync(register_group(_Sync(r), "default"))
    t = Transitions(Scripts(r), lease_ms=30000, session_ttl=60)
    run_sync(t.register_worker("default", "w1", free=1, total=1))
    return t


def _submit(t: Transitions, rid: str, sid: str, max_tokens: object) -> tuple[str, int]:
    req = NewRequest(session_id=sid, max_tokens=max_tokens, priority=5, tenant="t", group="default",  # type: ignore[arg-type]
                     prompt="hello", request_id=keys.bucket_of_session(sid) + rid)
    return run_sync(t.submit(req))


@pytest.mark.single_server  # the one-server form of a transition
def test_a_call_that_fails_half_way_still_writes_the_events_it_numbered(r: redis.Redis) -> None:
    """Events are written when a call ends (one log write per session). A call that fails after
    numbering an event must still write it, or the log's offsets would stop matching the event ids;
    and the failure itself must reach the caller, a Lua error and a command's error alike."""
    t = _transitions(r)  # a free slot: the submit starts its request at once

    # a Lua error after `queued` was numbered (max_tokens is no number: the quota check fails on it)
    with pytest.raises(redis.ResponseError, match="arithmetic"):
        _submit(t, "rid-a", "s-a", "many")
    assert r.hget(keys.session_meta("s-a"), "seq") == "1"
    assert [e.split("|")[1] for e in r.lrange(keys.session_log("s-a"), 0, -1)] == ["queued"]

    # a command's error after `queued` was numbered (the slot list is not a list)
    r.delete(keys.group_key("default", "idle"))
    r.set(keys.group_key("default", "idle"), "not a list")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        _submit(t, "rid-b", "s-b", 4)
    assert r.hget(keys.session_meta("s-b"), "seq") == "1"
    assert [e.split("|")[1] for e in r.lrange(keys.session_log("s-b"), 0, -1)] == ["queued"]


@pytest.mark.single_server  # the one-server form of a transition
def test_a_call_that_fails_after_a_restarts_jump_keeps_the_jump(r: redis.Redis) -> None:
    """A call writes its sessions' last ids when it ends, but a restart's jump at once, with the boot
    that makes it: a call that fails after noting the new boot and before its first event must not
    leave the boot noted and the ids not skipped, or the next id could name an event the restart lost."""
    t = _transitions(r)
    run_sync(t.register_worker("default", "w1", free=0, total=1))  # no free slot: the submits only queue
    assert _submit(t, "r1", "jumped", 4) == ("ok", 1)
    assert _submit(t, "r2", "jumped", 4) == ("ok", 2)
    r.function_flush()  # a new boot
    queue = keys.session_queue("jumped")
    waiting = r.lrange(queue, 0, -1)
    r.delete(queue)
    r.set(queue, "not a list")  # the submit fails after its boot check, before it numbers an event
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        _submit(t, "r3", "jumped", 4)
    assert meta(r, "jumped")[0] == 2 + JUMP
    r.delete(queue)
    r.rpush(queue, *waiting)
    assert _submit(t, "r4", "jumped", 4) == ("ok", 2 + JUMP + 1)
    assert log_ids(r, "jumped") == [1, 2, 2 + JUMP + 1]


@pytest.mark.single_server  # the one-server form of a transition
def test_one_call_on_two_sessions_after_a_restart_jumps_each_once(r: redis.Redis) -> None:
    """A finish that ends one session's run and starts another session's waiting request, the first
    call after a restart: each session skips once, and each stored last id is its log's last."""
    t = _transitions(r)  # one free slot
    assert _submit(t, "ra", "first", 4) == ("ok", 1)  # queued 1, started 2
    assert _submit(t, "rb", "second", 4) == ("ok", 1)  # queued 1: waits for the slot
    r.function_flush()
    assert run_sync(t.finish(keys.bucket_of_session("first") + "ra", "1", wid="w1", group="default",
                             outcome="done", detail="stop", return_slot=True,
                             tail=Tail(0, ['{"text":"a"}', '{"text":"b"}'])))
    assert log_ids(r, "first") == [1, 2, 2 + JUMP + 1, 2 + JUMP + 2, 2 + JUMP + 3]  # two tokens and done
    assert meta(r, "first")[0] == 2 + JUMP + 3
    assert [e.split("|")[1] for e in r.lrange(keys.session_log("second"), 0, -1)] == ["queued", "started"]
    assert log_ids(r, "second") == [1, 1 + JUMP + 1] and meta(r, "second")[0] == 1 + JUMP + 1


@pytest.mark.single_server  # the one-server form of a transition
def test_a_call_reads_the_meta_afresh_not_what_an_earlier_call_saw(r: redis.Redis) -> None:
    """What a call learns of a session (its boot checked, its last id) lives for that call only: between
    two calls another writer (a second library version in a rolling upgrade, `sluicegate migrate`) may
    move the last id, and the next call must number on from there."""
    t = _transitions(r)
    run_sync(t.register_worker("default", "w1", free=0, total=1))
    assert _submit(t, "q1", "moved", 4) == ("ok", 1)
    r.hset(keys.session_meta("moved"), "seq", 50)
    assert run_sync(t.cancel(keys.bucket_of_session("moved") + "q1")) == ["cancelled"]
    assert log_ids(r, "moved") == [1, 51] and meta(r, "moved")[0] == 51


@pytest.mark.single_server  # the one-server form of a transition
def test_a_submit_whose_ready_fails_counts_its_stored_request_waiting(r: redis.Redis) -> None:
    """submit_one counts its head waiting after `ready`, which may start it instead. A ready that fails
    leaves the request stored and queued (nothing rolls back): it must be counted, or its later cancel,
    start or expiry takes back a count never made and the planes' depth drifts below zero (the gauge
    clips it, so /metrics would hide the drift)."""
    t = _transitions(r)
    label = "depth|default|5|t"  # group|priority|tenant of _submit's requests
    ready_heads = keys.group_key("default", "rq")
    r.set(ready_heads, "not a hash")  # ready's first read fails: after the request is stored
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        _submit(t, "stuck", "s-ready", 4)
    assert raw_depths(r, ["default"]).get(label) == 1
    r.delete(ready_heads)
    assert run_sync(t.cancel(keys.bucket_of_session("s-ready") + "stuck")) == ["cancelled"]
    assert raw_depths(r, ["default"]).get(label) == 0


@pytest.mark.single_server  # the one-server form of a transition
def test_a_submit_that_starts_at_once_writes_its_two_events_in_one_message(r: redis.Redis) -> None:
    t = _transitions(r)
    pubsub = r.pubsub()
    pubsub.ssubscribe(keys.session_channel("s-1"))
    assert pubsub.get_sharded_message(timeout=5)["type"] == "ssubscribe"
    assert _submit(t, "rid-1", "s-1", 4) == ("ok", 1)
    message = pubsub.get_sharded_message(timeout=5)
    assert [line.split("|")[:2] for line in message["data"].split("\n")] == [["1", "queued"], ["2", "started"]]
    assert r.llen(keys.session_log("s-1")) == 2
    assert pubsub.get_sharded_message(timeout=0.2) is None
    pubsub.close()
