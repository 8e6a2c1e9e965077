"""The library paces the functions VM's garbage collector (sessions/lua/includes/call.lua): the first
call after each load sets the step multiplier, and the VM's heap stays bounded under a stream of calls.
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


def test_the_first_call_after_a_load_paces_the_collector(r: redis.Redis) -> None:
    r.function_flush()
    r.function_load(PROBE)
    _step_multiplier(r, LUA_DEFAULT_STEP_MULTIPLIER)  # whatever an earlier library left in this VM
    t = _transitions(r)  # loads the library on its first call, and calls it
    assert _step_multiplier(r) == LIBRARY_STEP_MULTIPLIER
    # the library's later calls leave a multiplier alone: it is set once per load, not per call
    _step_multiplier(r, LUA_DEFAULT_STEP_MULTIPLIER)
    _submit(t, 0)
    assert _step_multiplier(r) == LUA_DEFAULT_STEP_MULTIPLIER


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


def test_a_collector_that_falls_behind_is_caught_up_by_a_full_collection(r: redis.Redis) -> None:
    """The same submits with the VM's multiplier at 1 (set through the probe after the library paced the VM,
    which it does once per load): the collector cannot keep up (the heap passed 20 MB), so a call that
    finds the heap past the library's limit (8 MB) collects it in full first."""
    r.function_flush()
    r.function_load(PROBE)
    t = _transitions(r)
    _step_multiplier(r, 1)
    sizes = []
    for n in range(3000):
        _submit(t, n)
        if n % 100 == 0:
            sizes.append(int(r.info("memory")["used_memory_vm_functions"]))
    assert max(sizes) < 9 * 2**20, [size // 1024 for size in sizes]
    assert min(sizes[10:]) < 4 * 2**20, [size // 1024 for size in sizes]  # collected, not stuck at the limit


def _submit(t: object, n: int) -> None:
    sid = f"gc-{n}"
    req = NewRequest(session_id=sid, max_tokens=16, priority=5, tenant="t", group="default",
                     prompt="a prompt of a hundred characters " * 3, request_id=keys.bucket_of_session(sid) + f"r{n}")
    run_sync(t.submit(req))  # type: ignore[attr-defined]
