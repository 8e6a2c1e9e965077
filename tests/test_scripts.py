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
from sluicegate.sessions.transitions import Transitions, run_sync
from tests.helpers import Stack, sse, submit
from tests.sched_harness import _Sync


@pytest.mark.single_server  # the one-server functions and one FUNCTION LIST; the cluster reload: test below
def test_a_server_without_the_library_gets_it_on_the_first_call(redis_url: str, r: redis.Redis) -> None:
    r.function_flush()
    scripts = Scripts(redis.Redis.from_url(redis_url))
    nobody = keys.session_prefix("nobody")
    assert scripts.call("read_log", [nobody], ["nobody", 0, 10]) == [0, 1, b""]  # last id, oldest kept, holes
    [library] = [dict(zip(entry[::2], entry[1::2], strict=True)) for entry in r.function_list()]
    assert library["library_name"] == library_source().split()[1].removeprefix("name=")
    functions = {f[1] for f in library["functions"]}  # ["name", <name>, "description", ...]
    assert function_name("submit") in functions and functions == {function_name(name) for name in FUNCTIONS}
    assert function_name("submit").startswith("sg_") and function_name("submit") != "sg_submit"
    flags = {f[1]: set(f[5]) for f in library["functions"]}  # [..., "flags", [...]]
    assert flags[function_name("read_log")] == {"no-writes"} and flags[function_name("submit")] == set()
    # a reader still reads where writes are refused (as on a replica): FCALL_RO runs only no-writes functions
    assert r.fcall_ro(function_name("read_log"), 1, nobody, scripts.flags, "nobody", 0, 10) == [0, 1, ""]


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
