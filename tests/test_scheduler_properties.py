"""Property test: random interleavings of submit (random sessions, tenants, classes, groups), cancel, preemption
(higher classes arriving with no free slot), token appends, finish, hand-back, lease expiry, heartbeats, clock
ticks with aging and quota changes never lose, duplicate or reorder a session's requests, and every structure
of the ready set stays consistent. The test plays the workers against the real scripts on a real Redis."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sluicegate.sessions import keys
from tests.sched_harness import Harness

LEASE = 2000
SLOTS = {"w0": ("g0", 1), "w1": ("g1", 1), "w2": ("g1", 2)}
TERMINAL = {"done", "failed", "cancelled"}
QUOTAS = [
    {"requests_per_second": 5, "burst": 2},
    {"tokens_per_second": 20, "burst_tokens": 8},
    {"max_concurrency": 1},
    {"requests_per_second": None, "tokens_per_second": None, "burst": None, "burst_tokens": None,
     "max_concurrency": None},
]

pick = st.integers(0, 1000)
STEPS = {
    "submit": st.tuples(st.just("submit"), st.integers(0, 5), st.integers(0, 2), st.integers(0, 9),
                        st.integers(0, 1), st.integers(1, 4)),
    "work": st.tuples(st.just("work"), pick, st.integers(1, 3)),
    "finish": st.tuples(st.just("finish"), pick, st.sampled_from(["done", "done", "failed"])),
    "cancel": st.tuples(st.just("cancel"), pick),
    "handback": st.tuples(st.just("handback"), pick),
    "expire": st.tuples(st.just("expire")),
    "heartbeat": st.tuples(st.just("heartbeat"), st.sampled_from(sorted(SLOTS))),
    "tick": st.tuples(st.just("tick"), st.integers(0, 2000)),
    "quota": st.tuples(st.just("quota"), st.integers(0, 1), st.integers(0, len(QUOTAS) - 1)),
}
MIX = ["submit"] * 8 + ["work"] * 4 + ["finish"] * 4 + ["cancel", "cancel", "handback", "expire", "heartbeat",
                                                          "tick", "tick", "quota", "quota"]
OPS = st.sampled_from(MIX).flatmap(STEPS.__getitem__)


# One read of the whole keyspace (metrics and prompts aside), atomic and cheap to parse.
SNAPSHOT_LUA = """
local out = {}
for _, name in ipairs(redis.call('KEYS', 'sg:*')) do
  if not string.find(name, '^sg:{[^}]*}:m$') and not string.find(name, ':in$') then
    local kind = redis.call('TYPE', name)['ok']
    if kind == 'hash' then out[name] = { 'h', redis.call('HGETALL', name) }
    elseif kind == 'list' then out[name] = { 'l', redis.call('LRANGE', name, 0, -1) }
    elseif kind == 'zset' then out[name] = { 'z', redis.call('ZRANGE', name, 0, -1, 'WITHSCORES') } end
  end
end
return cjson.encode(out)
"""


@dataclass
class Snapshot:
    """Every sg:* key, read in one pipeline."""

    requests: dict[str, dict[str, str]] = field(default_factory=dict)
    queues: dict[str, list[str]] = field(default_factory=dict)
    logs: dict[str, list[tuple[int, str, str, dict[str, Any]]]] = field(default_factory=dict)
    zsets: dict[str, dict[str, float]] = field(default_factory=dict)
    hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def take(cls, r: redis.Redis) -> Snapshot:
        snap = cls()
        for name, (kind, flat) in json.loads(r.eval(SNAPSHOT_LUA, 0)).items():
            flat = flat or []  # cjson encodes an empty table as {}
            if kind == "h":
                value: Any = dict(zip(flat[::2], flat[1::2], strict=True))
            elif kind == "z":
                value = {m: float(v) for m, v in zip(flat[::2], flat[1::2], strict=True)}
            else:
                value = flat
            if m := re.fullmatch(r"sg:\{s:..\}:r:([^:]+)", name):
                snap.requests[m[1]] = value
            elif m := re.fullmatch(r"sg:\{s:..\}:s:([^:]+):q", name):
                snap.queues[m[1]] = value
            elif m := re.fullmatch(r"sg:\{s:..\}:s:([^:]+):l", name):
                entries = [e.split("|", 3) for e in value]
                snap.logs[m[1]] = [(int(s), ev, rid, json.loads(d)) for s, ev, rid, d in entries]
            elif kind == "z":
                snap.zsets[name] = value
            elif kind == "h":
                snap.hashes[name] = value
            else:
                snap.lists[name] = value
        return snap


def check(h: Harness, order: dict[str, list[str]]) -> Snapshot:
    """The invariants, from one consistent read of the whole keyspace."""
    snap = Snapshot.take(h.r)
    req = snap.requests
    # Session queues: submission order minus the terminal ones; one run per session; only heads run.
    for sid, rids in order.items():
        live = [x for x in rids if req[x]["st"] not in TERMINAL]
        assert snap.queues.get(sid, []) == live, (sid, live)
        assert sum(req[x]["st"] == "running" for x in rids) <= 1
        assert all(req[x]["st"] == "queued" for x in live[1:]), "only a session's head runs or is preempted"
    # The ready set: a session is in exactly one ready zset iff its head waits, the one of its head's
    # group, effective class and tenant.
    ready: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for name, members in snap.zsets.items():
        if m := re.fullmatch(r"sg:\{g:([^}]+)\}:c(\d+):(.+)", name):
            for sid in members:
                ready[sid].append((m[1], m[2], m[3]))
    for sid in set(order) | set(ready):
        live = snap.queues.get(sid, [])
        head = req[live[0]] if live else None
        if head is None or head["st"] == "running":
            assert sid not in ready, (sid, ready.get(sid))
        else:
            assert head["st"] in ("queued", "preempted")
            assert ready[sid] == [(head["g"], head["ep"], head["tn"])]
    for group in ("g0", "g1"):
        check_group(h, snap, group, ready)
    # Runs: the run zset, the leases and the fake workers agree; nothing runs twice.
    running = {rid for rid, f in req.items() if f["st"] == "running"}
    leased = {key.rpartition("|")[0] for g in ("g0", "g1") for key in snap.zsets.get(keys.group_key(g, "leases"), {})}
    assert leased == running
    owners = Counter(run.rid for run in h.runs if not run.fenced and req[run.rid]["st"] == "running"
                     and req[run.rid]["a"] == run.attempt)
    assert set(owners) == running and all(n == 1 for n in owners.values()), "a running request has one owner"
    for run in h.runs:
        f = req[run.rid]
        if f["st"] == "running" and f["a"] == run.attempt:
            assert f["w"] == run.wid
    # Slots are conserved: free tickets plus held runs = slots, per live worker; a worker retired
    # by the sweep (its lease lapsed) holds no ticket until its heartbeat offers its slots again. A run
    # whose slot was handed over (fair-share preemption) holds no ticket: it is fenced, and only waits
    # for its worker to let go.
    for wid, (group, slots) in SLOTS.items():
        free = snap.lists.get(keys.group_key(group, "idle"), []).count(wid)
        ticketed = snap.hashes.get(keys.group_key(group, "tk"), {})
        held = [run for run in h.runs if run.wid == wid]
        handed = [run for run in held if f"{run.rid}|{run.attempt}" not in ticketed]
        for run in handed:
            f = req[run.rid]
            assert not (f["st"] == "running" and f["a"] == run.attempt), ("a handed-over run still runs", run)
        if h.r.exists(keys.worker(group, wid)):
            assert free + len(held) - len(handed) == slots, wid
            if handed:
                event("a slot was handed over")
        else:
            assert free == 0, wid
    # Exactly once, in order, and session order in the log.
    for sid, rids in order.items():
        log = snap.logs.get(sid, [])
        assert [e[0] for e in log] == list(range(log[0][0], log[0][0] + len(log))) if log else True
        for rid in rids:
            assert [d["index"] for _, ev, x, d in log if x == rid and ev == "token"] == list(range(int(req[rid]["n"])))
        first_start = {}
        terminal_at = {}
        for pos, (_, ev, x, _) in enumerate(log):
            if ev == "started":
                assert x not in first_start, "started twice"
                first_start[x] = pos
            if ev in ("done", "error", "cancelled"):
                assert x not in terminal_at, "two terminal events"
                terminal_at[x] = pos
        for i, earlier in enumerate(rids):
            for later in rids[i + 1:]:
                if later in first_start:
                    assert earlier in terminal_at and terminal_at[earlier] < first_start[later], (earlier, later)
    return snap


def check_group(h: Harness, snap: Snapshot, group: str, ready: dict[str, list[tuple[str, str, str]]]) -> None:
    def z(suffix: str) -> dict[str, float]:
        return snap.zsets.get(keys.group_key(group, suffix), {})

    def hm(suffix: str) -> dict[str, str]:
        return snap.hashes.get(keys.group_key(group, suffix), {})

    per_class: Counter[str] = Counter()
    per_tenant: Counter[str] = Counter()
    tenants_in_class: dict[str, set[str]] = defaultdict(set)
    sessions_in_class: dict[str, set[str]] = defaultdict(set)
    for sid, places in ready.items():
        for g, cls, tenant in places:
            if g == group:
                per_class[cls] += 1
                per_tenant[tenant] += 1
                tenants_in_class[cls].add(tenant)
                sessions_in_class[cls].add(sid)
    assert {k: int(v) for k, v in hm("cn").items()} == dict(per_class)
    assert {k: int(v) for k, v in hm("btn").items()} == dict(per_tenant)
    assert set(z("cls")) == set(per_class)
    vtc = defaultdict(float, {t: float(v) for t, v in hm("vtc").items()})  # never charged = 0
    assert z("bt") == {t: vtc[t] for t in per_tenant}
    for cls in range(11):
        scores = z(f"c{cls}")  # a class score may lag behind its tenant's counter, never lead it
        assert set(scores) == tenants_in_class.get(str(cls), set()), cls
        assert all(score <= vtc[t] for t, score in scores.items()), (cls, scores, dict(vtc))
        if cls < 10:
            assert set(z(f"age{cls}")) == sessions_in_class.get(str(cls), set())
    assert set(hm("rq")) == set().union(*sessions_in_class.values()), "a ready session has its head's spec"
    running = {rid for rid, f in snap.requests.items() if f["st"] == "running" and f["g"] == group}
    assert {key.rpartition("|")[0] for key in z("run")} == running
    # Who holds the running slots (fair-share preemption): rt:<tenant> = its runs, ro = runs / weight.
    by_tenant: dict[str, dict[str, float]] = defaultdict(dict)
    for key, score in z("run").items():
        by_tenant[snap.requests[key.rpartition("|")[0]]["tn"]][key] = score
    assert {name.rpartition(":rt:")[2]: members for name, members in snap.zsets.items()
            if name.startswith(keys.group_key(group, "rt:"))} == by_tenant
    weights = {t: float(w) for t, w in hm("tw").items()}
    assert z("ro") == pytest.approx({t: len(runs) / weights.get(t, 1.0) for t, runs in by_tenant.items()})
    held = {f"{run.rid}|{run.attempt}" for run in h.runs}
    assert set(z("pre")) <= held, "a slot being freed belongs to a run a worker still holds"


def apply(h: Harness, op: tuple[Any, ...], order: dict[str, list[str]], rids: list[str]) -> None:
    name = op[0]
    if name == "submit":
        _, s, t, prio, g, mt = op
        sid = f"s{s}"
        rid = h.submit(sid, tenant=f"t{t}", priority=prio, group=f"g{g}", max_tokens=mt)
        order.setdefault(sid, []).append(rid)
        rids.append(rid)
    elif name == "cancel" and rids:
        reply = h.cancel(rids[op[1] % len(rids)])
        assert reply[0] in ("cancelled", "terminal")
    elif name in ("work", "finish", "handback") and h.runs:
        run = h.runs[op[1] % len(h.runs)]
        if name == "work":
            room = int(h.r.hget(keys.request(run.rid), "mt") or 0) - run.next_index
            if room > 0:
                assert h.append(run, min(room, op[2]))[0] in (0, 1)
        elif name == "finish":
            h.finish(run, outcome=op[2])
        else:
            h.handback(run, reason="backend_error")
    elif name == "expire":
        h.advance(LEASE + 1)
        h.sweep()
    elif name == "heartbeat":
        lost = set(h.heartbeat(op[1]))
        owned = {f"{run.rid}|{run.attempt}" for run in h.runs if run.wid == op[1]
                 and h.r.hget(keys.request(run.rid), "st") == "running"
                 and h.r.hget(keys.request(run.rid), "a") == run.attempt}
        assert lost == {f"{run.rid}|{run.attempt}" for run in h.runs if run.wid == op[1]} - owned
    elif name == "tick":
        h.advance(op[1])
        h.sweep()
    elif name == "quota":
        h.quota(f"g{op[1]}", **QUOTAS[op[2]])
        h.sweep()


def drain(h: Harness, order: dict[str, list[str]], rids: list[str]) -> None:
    """Lift the quotas and play well-behaved workers until every request has ended."""
    for group in ("g0", "g1"):
        h.quota(group, **QUOTAS[-1])
    h.sweep()
    for _ in range(500):
        if not h.runs and all(h.status(x) in TERMINAL for x in rids):
            break
        for run in list(h.runs):
            f = h.req(run.rid)
            if f["st"] == "running" and f["a"] == run.attempt:
                room = int(f["mt"]) - run.next_index
                if room > 0:
                    assert h.append(run, room)[0] == 1
            h.finish(run)
        for wid in SLOTS:
            h.heartbeat(wid)
        h.advance(10)
        h.sweep()
        check(h, order)
    snap = check(h, order)
    assert all(snap.requests[x]["st"] in TERMINAL for x in rids), "a request never ended"
    assert not h.runs
    for group in ("g0", "g1"):
        assert not any(name.startswith(keys.group_key(group, "c")) for name in snap.zsets), "ready set not empty"
        assert not snap.zsets.get(keys.group_key(group, "run"))


# Two classes in the three-slot group: the contention inside a class that fair-share preemption acts on.
SAME_CLASS_OPS = st.sampled_from(MIX).flatmap(lambda name: st.tuples(
    st.just("submit"), st.integers(0, 7), st.integers(0, 2), st.sampled_from([5, 5, 5, 6]), st.just(1),
    st.integers(2, 6)) if name == "submit" else STEPS[name])


PROPERTY = settings(deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(PROPERTY, max_examples=60)
@given(ops=st.lists(OPS, min_size=20, max_size=60))
@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_random_interleavings_keep_every_invariant(r: redis.Redis, ops: list[tuple[Any, ...]]) -> None:
    play(r, ops)


@settings(PROPERTY, max_examples=40)
@given(ops=st.lists(SAME_CLASS_OPS, min_size=20, max_size=60))
@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_random_interleavings_within_a_class_keep_every_invariant(r: redis.Redis, ops: list[tuple[Any, ...]]) -> None:
    play(r, ops)


@settings(PROPERTY, max_examples=40)
@given(ops=st.lists(SAME_CLASS_OPS, min_size=20, max_size=60))
@pytest.mark.single_server  # the deterministic harness pins the clock (a global key)
def test_random_interleavings_with_a_headroom_keep_every_invariant(r: redis.Redis,
                                                                   ops: list[tuple[Any, ...]]) -> None:
    """A headroom of one slot in the three-slot group (--fair-share-headroom 0.34): held back from the
    heaviest tenant, the slot is still conserved, and everything still ends."""
    play(r, ops, headroom=0.34)


def play(r: redis.Redis, ops: list[tuple[Any, ...]], headroom: float = 0.0) -> None:
    r.flushall()
    h = Harness(r, lease_ms=LEASE)
    h.policy(min_run=0, max_pre=2, mw0=3, mw1=3, mw2=3, mw3=3, mw4=3, fsr=headroom)
    for wid, (group, slots) in SLOTS.items():
        h.add_worker(wid, group=group, slots=slots)
    order: dict[str, list[str]] = {}
    rids: list[str] = []
    for op in ops:
        apply(h, op, order, rids)
        check(h, order)
    drain(h, order, rids)
    attempts = Counter((run.rid, run.attempt) for run in h.dispatched)
    assert all(n == 1 for n in attempts.values()), "an attempt was dispatched twice"
    snap = Snapshot.take(r)  # what the example exercised (pytest --hypothesis-show-statistics)
    for log in snap.logs.values():
        for _, ev, _, data in log:
            if ev in ("preempted", "resumed", "cancelled", "error"):
                event(f"{ev}:{data.get('reason', '')}" if ev == "preempted" else ev)
    if any(f.get("ep") == "10" for f in snap.requests.values()):
        event("aged")
