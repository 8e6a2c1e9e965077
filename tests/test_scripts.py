"""The scripts as one function library: loaded on demand, reloaded when the server lost it, and
named by a digest of their source so that two versions never call each other's code."""

from __future__ import annotations

import redis

from sessions.scripts import Scripts, function_name, library_source
from tests.helpers import Stack, sse, submit


def test_a_server_without_the_library_gets_it_on_the_first_call(redis_url: str, r: redis.Redis) -> None:
    r.function_flush()
    scripts = Scripts(redis.Redis.from_url(redis_url))
    assert scripts.read_log(keys=["sg:s:nobody:m", "sg:s:nobody:l"], args=[0, 10]) == [0]
    [library] = [dict(zip(entry[::2], entry[1::2], strict=True)) for entry in r.function_list()]
    assert library["library_name"] == library_source().split()[1].removeprefix("name=")
    functions = {f[1] for f in library["functions"]}  # ["name", <name>, "description", ...]
    assert function_name("submit") in functions and len(functions) == 9
    assert function_name("submit").startswith("sg_") and function_name("submit") != "sg_submit"
    flags = {f[1]: set(f[5]) for f in library["functions"]}  # [..., "flags", [...]]
    assert flags[function_name("read_log")] == {"no-writes"} and flags[function_name("submit")] == set()
    # a reader still reads where writes are refused (as on a replica): FCALL_RO runs only no-writes functions
    assert r.fcall_ro(function_name("read_log"), 2, "sg:s:nobody:m", "sg:s:nobody:l", 0, 10) == [0]


def test_requests_flow_on_after_the_server_loses_the_library(stack: Stack, r: redis.Redis) -> None:
    first = submit(stack.base_url, "lib-1", max_tokens=3)
    assert [e.event for e in sse(stack.base_url, f"/v1/requests/{first}/events")][-1] == "done"
    r.function_flush()  # e.g. a fresh server under the same address: API and worker must reload it
    second = submit(stack.base_url, "lib-2", max_tokens=3)
    events = list(sse(stack.base_url, f"/v1/requests/{second}/events"))
    assert [e.event for e in events if e.event != "token"] == ["queued", "started", "done"]
    assert [e.data["index"] for e in events if e.event == "token"] == [0, 1, 2]
