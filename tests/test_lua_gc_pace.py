"""The library paces the functions VM's garbage collector (sessions/lua/includes/call.lua): every call
sets the step multiplier, the VM's heap stays small under a stream of calls, and a large heap gets Lua's
default pace back until it is small again.
What the pace buys (the decision's p99) is a benchmark's figure (`./dev bench decision`), not a test's."""

from __future__ import annotations

import re

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.library import DATA_DIR
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.transitions import run_sync
from tests.test_scripts import _transitions

pytestmark = pytest.mark.single_server  # one server's VM, read through a probe library of its own

LUA_DEFAULT_STEP_MULTIPLIER = 200
LIBRARY_STEP_MULTIPLIER = int(re.findall(r"^local GC_STEP_MULTIPLIER = (\d+)$",
                                         (DATA_DIR / "includes" / "call.lua").read_text(), re.M)[0])
PROBE = ("#!lua name=gc_probe\n"
         "redis.register_function('gc_probe_set', function(keys, args)\n"
         "  return collectgarbage('setstepmul', tonumber(args[1])) end)\n")


def _step_multiplier(r: redis.Redis, new: int | None = None) -> int:
    """The VM's step multiplier; set to `new` if given (else put back as it was)."""
    old = int(r.fcall("gc_probe_set", 0, new if new is not None else 100))
    if new is None:
        r.fcall("gc_probe_set", 0, old)
    return old


def test_every_call_paces_the_collector(r: redis.Redis) -> None:
    r.function_flush()
    r.function_load(PROBE)
    _step_multiplier(r, LUA_DEFAULT_STEP_MULTIPLIER)  # whatever an earlier library left in this VM
    t = _transitions(r)  # loads the library on its first call, and calls it
    assert _step_multiplier(r) == LIBRARY_STEP_MULTIPLIER
    _step_multiplier(r, LUA_DEFAULT_STEP_MULTIPLIER)  # another library's doing, say
    _submit(t, 0)
    assert _step_multiplier(r) == LIBRARY_STEP_MULTIPLIER  # put right by the next call


def test_the_vms_heap_stays_bounded_at_the_slower_pace(r: redis.Redis) -> None:
    """At a multiplier below 100 Lua's collector can fall behind what a call allocates, with nothing but
    the server's own step (every 50th call) to catch up. 3,000 submits (each a session of its own, its
    request queued behind the one slot) allocate several MB in the VM; the heap must stay near its
    size at rest (about 0.3 MB for the library) all along."""
    r.function_flush()
    t = _transitions(r)
    sizes = []
    for n in range(3000):
        _submit(t, n)
        if n % 100 == 0:
            sizes.append(int(r.info("memory")["used_memory_vm_functions"]))
    assert max(sizes) < 2 * 2**20, [size // 1024 for size in sizes]


def test_a_large_heap_gets_lua_s_default_pace_until_it_is_small_again(r: redis.Redis) -> None:
    """A 12 MB prompt sits in the VM's heap (its argument, then the call's own copy): past 4 MB the calls set
    Lua's default multiplier, and the slower pace comes back only once the heap is under 2 MB. No full
    collection: one of 8 MB stopped the server for 20-30 ms."""
    r.function_flush()
    r.function_load(PROBE)
    t = _transitions(r)
    _submit(t, 0, prompt="x" * (12 * 2**20))
    assert int(r.info("memory")["used_memory_vm_functions"]) > 4 * 2**20
    assert _step_multiplier(r) == LUA_DEFAULT_STEP_MULTIPLIER
    for n in range(1, 3001):
        _submit(t, n)
        if _step_multiplier(r) == LIBRARY_STEP_MULTIPLIER:
            break
    else:
        raise AssertionError("the calls never went back to the slower pace")
    assert int(r.info("memory")["used_memory_vm_functions"]) < 2 * 2**20
    _submit(t, n + 1)  # and it stays there while the heap is small
    assert _step_multiplier(r) == LIBRARY_STEP_MULTIPLIER


def _submit(t: object, n: int, prompt: str = "a prompt of a hundred characters " * 3) -> None:
    sid = f"gc-{n}"
    req = NewRequest(session_id=sid, max_tokens=16, priority=5, tenant="t", group="default", prompt=prompt,
                     request_id=keys.bucket_of_session(sid) + f"r{n}")
    run_sync(t.submit(req))  # type: ignore[attr-defined]
