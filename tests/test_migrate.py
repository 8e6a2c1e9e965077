"""`sluicegate migrate`: a deployment written in the old key layout (commit 411e505: sg:r:<rid>,
sg:s:<sid>:m|q|l, sg:g:<G>:*, global leases, workers and metrics; 12-character request ids) moves to
the new one and the new stack picks it up: queued work runs in session order, an interrupted request
resumes from its tokens, a client's resume cursor from before the migration still works, quotas and
tenant weights stay in force, no old key is left, and running it again changes nothing."""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
from typing import Any

import pytest
import redis

from sluicegate.cli import main as cli_main
from sluicegate.migrate import ALIAS_RETENTION, migrate
from sluicegate.sessions import keys
from sluicegate.workers.engines.sim import prompt_seed, sim_text, sim_token
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, sse, submit, wait_for
from tests.metrics_helpers import raw_depths

TENANT, GROUP, WEIGHT = "acme", "default", 4.0
KEPT_GLOBALS = {keys.GROUPS, keys.GROUPS_HINT, keys.TENANT_WEIGHTS, keys.POLICY}  # the hint: a stack's own start


def old_id() -> str:
    return secrets.token_urlsafe(9)  # the old ids: 12 URL-safe characters, no bucket


def cj(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


class OldDeployment:
    """Writes an old-layout deployment key by key (one key a command: valid on a cluster too)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.now = time.time() * 1000

    def session(self, sid: str, entries: list[tuple[str, str, dict[str, Any]]], *, queue: list[str],
                ttl: int | None = None) -> int:
        log = [f"{i}|{name}|{rid}|{cj(data)}" for i, (name, rid, data) in enumerate(entries, start=1)]
        self.r.hset(f"sg:s:{sid}:m", mapping={"seq": len(log), "base": 1, "tn": TENANT})
        self.r.rpush(f"sg:s:{sid}:l", *log)
        if queue:
            self.r.rpush(f"sg:s:{sid}:q", *queue)
        if ttl:
            self.r.expire(f"sg:s:{sid}:m", ttl)
            self.r.expire(f"sg:s:{sid}:l", ttl)
        return len(log)

    def request(self, rid: str, sid: str, *, status: str, max_tokens: int, fs: int, tokens: int = 0,
                attempts: int = 0, prompt: str | None = None, ttl: int | None = None, **extra: Any) -> None:
        fields = {"sid": sid, "tn": TENANT, "g": GROUP, "p": 5, "ep": 5, "mt": max_tokens, "ik": "p", "pa": "{}",
                  "it": 2, "st": status, "sub": self.now - 5000, "n": tokens, "a": attempts, "fs": fs, **extra}
        if attempts:
            fields |= {"sa": self.now - 4000, "w": "w-old", "ds": self.now - 3000, "dn": 0, "ce": max_tokens,
                       "cr": max_tokens}
        if tokens:
            fields["ft"] = self.now - 3900
        self.r.hset(f"sg:r:{rid}", mapping=fields)
        if prompt is not None:
            self.r.set(f"sg:r:{rid}:in", prompt)
        if ttl:
            self.r.expire(f"sg:r:{rid}", ttl)


def tokens(rid: str, prompt: str, indices: range) -> list[tuple[str, str, dict[str, Any]]]:
    seed = prompt_seed(prompt)
    return [("token", rid, {"request_id": rid, "index": i, "text": sim_token(seed, i)}) for i in indices]


def write_old_deployment(r: redis.Redis, *, head_status: str) -> dict[str, Any]:
    """Session chat-a: one ended request, then P (3 tokens streamed; preempted, or still marked running
    when its worker died), then Q1 and Q2 queued. Session chat-b: idle, one ended request, a TTL.
    A quota (max_concurrency 1) on the group, a tenant weight, and the old control plane's leftovers."""
    old = OldDeployment(r)
    e1, p, q1, q2, e2 = (old_id() for _ in range(5))
    prompts = {p: "hello P", q1: "hello Q1", q2: "hello Q2"}
    a_log = [("queued", e1, {"position": 0, "priority": 5, "request_id": e1}),  # cjson: any member order
             ("started", e1, {"request_id": e1, "index": 0, "attempt": 1, "worker": "w-old"}),
             *tokens(e1, "e1", range(3)),
             ("done", e1, {"request_id": e1, "tokens": 3, "finish_reason": "length"}),
             ("queued", p, {"request_id": p, "priority": 5, "position": 0}),
             ("queued", q1, {"request_id": q1, "priority": 5, "position": 1}),
             ("queued", q2, {"request_id": q2, "priority": 5, "position": 2}),
             ("started", p, {"request_id": p, "index": 0, "attempt": 1, "worker": "w-old"}),
             *tokens(p, prompts[p], range(3))]
    if head_status == "preempted":  # its worker handed it back on SIGTERM
        a_log.append(("preempted", p, {"request_id": p, "index": 3, "reason": "shutdown"}))
    last_a = old.session("chat-a", a_log, queue=[p, q1, q2])
    old.request(e1, "chat-a", status="done", max_tokens=3, fs=1, tokens=3, attempts=1, ttl=3000, fin=old.now - 4500)
    old.request(p, "chat-a", status=head_status, max_tokens=8, fs=7, tokens=3, attempts=1, prompt=prompts[p],
                rs=old.now - 4800, rel1=1)
    old.request(q1, "chat-a", status="queued", max_tokens=5, fs=8, prompt=prompts[q1])
    old.request(q2, "chat-a", status="queued", max_tokens=5, fs=9, prompt=prompts[q2])
    b_log = [("queued", e2, {"request_id": e2, "priority": 5, "position": 0}),
             ("started", e2, {"request_id": e2, "index": 0, "attempt": 1, "worker": "w-old"}),
             *tokens(e2, "e2", range(2)),
             ("done", e2, {"request_id": e2, "tokens": 2, "finish_reason": "length"})]
    old.session("chat-b", b_log, queue=[], ttl=1000)
    old.request(e2, "chat-b", status="done", max_tokens=2, fs=1, tokens=2, attempts=1, ttl=1000, fin=old.now - 100)
    # globals that keep their names, and the group's quota
    r.sadd("sg:groups", GROUP)
    r.hset("sg:tenants", TENANT, WEIGHT)
    r.hset("sg:policy", mapping={"w_in": 1, "w_out": 2})
    r.hset(f"sg:g:{GROUP}:cfg", "max_concurrency", 1)
    # the old control plane, workers and metrics: all to go
    r.zadd(f"sg:g:{GROUP}:cls", {"5": 5})
    r.zadd(f"sg:g:{GROUP}:c5", {TENANT: 7})
    r.zadd(f"sg:g:{GROUP}:c5:{TENANT}", {"chat-a": old.now - 4800})
    r.hset(f"sg:g:{GROUP}:vtc", TENANT, 123)
    r.hset(f"sg:g:{GROUP}:qs", "throttled", "max_concurrency")
    r.rpush(f"sg:g:{GROUP}:idle", "w-old")
    r.zadd("sg:leases", {p: old.now + 1000})
    r.zadd("sg:wake", {GROUP: old.now})
    r.rpush("sg:hint", GROUP)
    r.hset("sg:workers", "w-old", 4)
    r.set("sg:w:w-old", 1)
    r.rpush("sg:w:w-old:in", f"{p}|1")
    r.hset("sg:m:depth", f"{GROUP}|5|{TENANT}", 2)
    r.hset("sg:m:requests", f"{GROUP}|5|{TENANT}|submitted", 5)
    return {"e1": e1, "p": p, "q1": q1, "q2": q2, "e2": e2, "prompts": prompts, "last_a": last_a}


def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Every key with its value and whether it has a TTL."""
    values: dict[str, Any] = {}
    for key in r.scan_iter(match="*", count=1000):
        kind = r.type(key)
        value: Any = {"string": r.get, "hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1),
                      "set": lambda k: sorted(r.smembers(k)),
                      "zset": lambda k: r.zrange(k, 0, -1, withscores=True)}[kind](key)
        values[key] = (kind, value, r.pttl(key) > 0)
    return values


def old_keys_left(r: redis.Redis) -> list[str]:
    return sorted(k for k in r.scan_iter(match="sg:*", count=1000)
                  if not (k.startswith("sg:{") or k.startswith("sg:alias:") or k in KEPT_GLOBALS))


def new(rid: str, sid: str) -> str:
    return keys.bucket_of_session(sid) + rid


@pytest.mark.parametrize("head_status", ["preempted", "running"])
def test_old_deployment_runs_on_after_migrate(redis_url: str, r: redis.Redis, head_status: str) -> None:
    old = write_old_deployment(r, head_status=head_status)
    out = io.StringIO()
    summary = migrate(redis_url, cluster=ON_CLUSTER, out=out)
    assert (summary.sessions, summary.queued, summary.ended, summary.stranded) == (2, 3, 2, 0)
    assert summary.interrupted == (head_status == "running") and summary.quotas == 1
    assert json.loads(out.getvalue().splitlines()[-1])["sessions"] == 2
    assert old_keys_left(r) == []

    ids = {name: new(old[name], "chat-a") for name in ("e1", "p", "q1", "q2")} | {"e2": new(old["e2"], "chat-b")}
    for name, rid in ids.items():  # recognisable, and found from the old id
        assert rid.endswith(old[name]) and keys.valid_request_id(rid)
        assert r.get(f"sg:alias:{old[name]}") == rid
    # TTLs: the idle session and the ended requests keep theirs; queued work has none
    for key in (keys.session_meta("chat-b"), keys.session_log("chat-b"), keys.request(ids["e2"]),
                f"sg:alias:{old['e2']}"):
        assert 990_000 < r.pttl(key) <= 1_000_000, key
    assert 2_990_000 < r.pttl(keys.request(ids["e1"])) <= 3_000_000
    assert 2_990_000 < r.pttl(f"sg:alias:{old['e1']}") <= 3_000_000
    for key in (keys.session_meta("chat-a"), keys.session_log("chat-a"), keys.session_queue("chat-a"),
                keys.request(ids["p"]), keys.request_input(ids["q2"])):
        assert r.pttl(key) == -1, key
    assert 0 < r.pttl(f"sg:alias:{old['q1']}") <= ALIAS_RETENTION * 1000  # an alias ends (test_every_alias_ends)
    assert r.lrange(keys.session_queue("chat-a"), 0, -1) == [ids["p"], ids["q1"], ids["q2"]]
    head = r.hgetall(keys.request(ids["p"]))
    assert head["st"] == "preempted" and head["n"] == "3" and head["a"] == "1"
    assert not {"w", "ds", "dn", "ce", "cr", "rs", "rel1"} & set(head)
    assert r.get(keys.request_input(ids["q1"])) == old["prompts"][old["q1"]]
    logged = r.lrange(keys.session_log("chat-a"), 0, -1)
    assert all(entry.split("|")[2] in ids.values() for entry in logged)
    assert all(json.loads(entry.split("|", 3)[3])["request_id"] == entry.split("|")[2] for entry in logged)
    assert r.hget(keys.session_meta("chat-a"), "seq") == str(len(logged)) == "14"  # + `preempted` if it was running
    assert r.hgetall(keys.group_key(GROUP, "cfg")) == {"max_concurrency": "1"}
    assert float(r.hget(keys.group_key(GROUP, "tw"), TENANT)) == WEIGHT

    stack = Stack(fast_settings(redis_url)).start(workers=1)
    try:
        base = stack.base_url
        # A client that had read up to event 12 (P's second token) before the migration resumes.
        pending = {ids["q2"]}
        resumed = list(sse(base, "/v1/sessions/chat-a/events", last_id=12, timeout=30,
                           until=lambda e: e.event == "done" and e.data["request_id"] in pending))
        assert [e.id for e in resumed] == list(range(13, 13 + len(resumed))), "a gap or a duplicate"
        assert resumed[0].event == "token" and resumed[0].data == {"request_id": ids["p"], "index": 2,
                                                                   "text": sim_token(prompt_seed("hello P"), 2)}
        assert resumed[1].event == "preempted" and resumed[1].data["index"] == 3
        assert resumed[2].event == "resumed" and resumed[2].data["index"] == 3 and resumed[2].data["attempt"] == 2
        order = [(e.event, e.data["request_id"]) for e in resumed if e.event in ("started", "resumed", "done")]
        assert order == [("resumed", ids["p"]), ("done", ids["p"]), ("started", ids["q1"]), ("done", ids["q1"]),
                         ("started", ids["q2"]), ("done", ids["q2"])]
        # The whole session: every token of each request once, in order, the resumed text continuing it
        pending = {ids["q2"]}
        full = list(sse(base, "/v1/sessions/chat-a/events", timeout=30,
                        until=lambda e: e.event == "done" and e.data["request_id"] in pending))
        assert [e.id for e in full] == list(range(1, len(full) + 1))
        for name, count in (("p", 8), ("q1", 5), ("q2", 5)):
            mine = [e.data for e in full if e.event == "token" and e.data["request_id"] == ids[name]]
            assert [t["index"] for t in mine] == list(range(count)), name
            assert "".join(t["text"] for t in mine) == sim_text(old["prompts"][old[name]], count)
        for name, attempts in (("p", 2), ("q1", 1), ("q2", 1), ("e1", 1)):
            code, view = call("GET", f"{base}/v1/requests/{ids[name]}")
            assert code == 200 and view["status"] == "done" and view["attempts"] == attempts, (name, view)
        code, view = call("GET", f"{base}/v1/requests/{ids['e2']}")
        assert code == 200 and view["session_id"] == "chat-b" and view["tokens"] == 2

        # The quota is in force: with 4 free slots, max_concurrency 1 still runs one request at a time.
        fresh = []
        threads = [threading.Thread(target=lambda i=i: fresh.append(submit(base, f"new-{i}", tenant=TENANT,
                                                                          max_tokens=20)))
                   for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        def views() -> list[dict[str, Any]] | None:
            got = [call("GET", f"{base}/v1/requests/{rid}")[1] for rid in fresh]
            return got if all(v["status"] == "done" for v in got) else None

        runs = sorted((v["started_at"], v["finished_at"]) for v in wait_for(views, timeout=20, what="new requests"))
        assert all(later[0] >= earlier[1] for earlier, later in zip(runs, runs[1:], strict=False)), runs
        assert r.hget(keys.group_key(GROUP, "qs"), "throttled") == "max_concurrency"
        # The weight is in force: every charge was divided by 4 (w_in 1, w_out 2; the resumed run pays
        # no input and only its 5 remaining tokens; a new one pays its prompt "hello" = 1 token).
        charged = (2 * 5 + (2 + 2 * 5) * 2 + (1 + 2 * 20) * 3) / WEIGHT
        assert float(r.hget(keys.group_key(GROUP, "vtc"), TENANT)) == pytest.approx(charged)
    finally:
        stack.stop()

    assert old_keys_left(r) == []
    before = snapshot(r)
    again = io.StringIO()
    second = migrate(redis_url, cluster=ON_CLUSTER, out=again)
    assert (second.sessions, second.queued, second.old_keys) == (0, 0, 0)
    assert len(again.getvalue().splitlines()) == 1
    assert snapshot(r) == before


def test_dry_run_changes_nothing(redis_url: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old_deployment(r, head_status="running")
    before = snapshot(r)
    argv = ["migrate", "--redis-url", redis_url, "--dry-run", *(["--redis-cluster"] if ON_CLUSTER else [])]
    assert cli_main(argv) == 0
    assert snapshot(r) == before
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sessions = {line["session"]: line for line in lines if "session" in line}
    assert set(sessions) == {"chat-a", "chat-b"}
    a = sessions["chat-a"]
    assert [(q["old"], q["new"]) for q in a["queue"]] == [(old[n], new(old[n], "chat-a")) for n in ("p", "q1", "q2")]
    assert a["interrupted"] == [new(old["p"], "chat-a")] and a["last_event_id"] == old["last_a"] + 1
    assert a["ttl_ms"] is None and [e["old"] for e in a["ended"]] == [old["e1"]]
    assert 990_000 < sessions["chat-b"]["ttl_ms"] <= 1_000_000
    summary = lines[-1]
    assert summary["dry_run"] is True and summary["sessions"] == 2 and summary["queued"] == 3
    assert summary["interrupted"] == 1 and summary["quotas"] == 1 and summary["old_keys"] == len(old_keys_left(r))


def test_refuses_while_the_old_workers_run(redis_url: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    write_old_deployment(r, head_status="running")
    r.set("sg:w:w-live", 1, px=60_000)  # a live old worker renews its lease: it could still write old keys
    before = snapshot(r)
    assert cli_main(["migrate", "--redis-url", redis_url, *(["--redis-cluster"] if ON_CLUSTER else [])]) == 1
    assert "w-live" in capsys.readouterr().err
    assert snapshot(r) == before


def test_the_queue_depth_after_migrate_counts_every_request_that_waits(redis_url: str, r: redis.Redis) -> None:
    """The gauge counts a request while its status says it waits (queued or preempted), a stranded one
    (in no session's queue: copied, cannot run) and an orphan (its session gone) too: its cancel takes it
    off like any other's. A rerun after dying half-way (the old keys not yet deleted) counts none twice."""
    old = write_old_deployment(r, head_status="preempted")
    stranded, orphan = old_id(), old_id()
    deployment = OldDeployment(r)
    deployment.request(stranded, "chat-a", status="queued", max_tokens=5, fs=10, prompt="lost")
    deployment.request(orphan, "chat-gone", status="queued", max_tokens=5, fs=1, prompt="orphan")
    summary = migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    assert (summary.queued, summary.stranded) == (3, 2)
    depth = {label: n for label, n in raw_depths(r, [GROUP]).items() if n}
    assert depth == {f"depth|{GROUP}|5|{TENANT}": 5}, (depth, old["p"])
    deployment.request(orphan, "chat-gone", status="queued", max_tokens=5, fs=1, prompt="orphan")  # not deleted
    assert migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO()).stranded == 1
    assert {label: n for label, n in raw_depths(r, [GROUP]).items() if n} == depth
    stack = Stack(fast_settings(redis_url)).start(workers=0)  # nothing runs
    try:
        assert call("DELETE", f"{stack.base_url}/v1/requests/{new(orphan, 'chat-gone')}")[0] == 200
    finally:
        stack.stop()
    assert {label: n for label, n in raw_depths(r, [GROUP]).items() if n} == {f"depth|{GROUP}|5|{TENANT}": 4}


@pytest.mark.parametrize("session_ttl", [600, ALIAS_RETENTION + 3600])
def test_every_alias_ends(redis_url: str, r: redis.Redis, session_ttl: int) -> None:
    """No one deletes an alias, so each has a TTL: its request's when it has one (an ended request),
    else ALIAS_RETENTION or the session TTL, the longer: for the requests still waiting (queued,
    preempted, interrupted), a stranded one and one whose session is gone (DESIGN: every key has an end)."""
    old = write_old_deployment(r, head_status="running")
    stranded, orphan = old_id(), old_id()
    deployment = OldDeployment(r)
    deployment.request(stranded, "chat-a", status="queued", max_tokens=5, fs=10, prompt="lost")
    deployment.request(orphan, "chat-gone", status="preempted", max_tokens=5, fs=1, prompt="orphan")
    summary = migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO(), session_ttl=session_ttl)
    assert (summary.queued, summary.stranded, summary.interrupted) == (3, 2, 1)
    kept = max(ALIAS_RETENTION, session_ttl) * 1000
    for name in (old["p"], old["q1"], old["q2"], stranded, orphan):
        assert r.get(f"sg:alias:{name}") is not None, name
        assert kept - 60_000 < r.pttl(f"sg:alias:{name}") <= kept, name
    assert 2_990_000 < r.pttl(f"sg:alias:{old['e1']}") <= 3_000_000  # an ended request's: it ends with it


def test_cancelling_a_stranded_request_of_an_expired_session_leaves_keys_that_end(redis_url: str,
                                                                                   r: redis.Redis) -> None:
    """A stranded request (it waits but is in no queue: copied with no TTL) outlives its idle session.
    Its cancel leaves no session keys that never end (its event would have recreated the meta and log,
    owned by no one), nor does an orphan's (its session was gone at migration). A session that had only
    a stranded request (kept with no TTL) gets the idle TTL when that ends, as after a head. A live
    session's keys (work still queued) keep no TTL when a request that is not its head is cancelled."""
    deployment = OldDeployment(r)
    ended, lost, orphan, alone = old_id(), old_id(), old_id(), old_id()
    deployment.session("chat-x", [("queued", ended, {"request_id": ended, "priority": 5, "position": 0}),
                                  ("done", ended, {"request_id": ended, "tokens": 0, "finish_reason": "length"})],
                       queue=[], ttl=1000)
    deployment.request(ended, "chat-x", status="done", max_tokens=1, fs=1, ttl=1000)
    deployment.request(lost, "chat-x", status="queued", max_tokens=5, fs=3, prompt="stranded")
    deployment.request(orphan, "chat-gone", status="queued", max_tokens=5, fs=1, prompt="orphan")
    deployment.session("chat-y", [("queued", alone, {"request_id": alone, "priority": 5, "position": 0})], queue=[])
    deployment.request(alone, "chat-y", status="queued", max_tokens=5, fs=1, prompt="alone")
    old = write_old_deployment(r, head_status="preempted")  # chat-a: P, then Q1 and Q2 queued
    summary = migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    assert summary.stranded == 3  # the orphan's too
    y_keys = (keys.session_meta("chat-y"), keys.session_log("chat-y"))
    assert [r.pttl(key) for key in y_keys] == [-1, -1]
    x_keys = (keys.session_meta("chat-x"), keys.session_log("chat-x"))
    r.delete(*x_keys)  # chat-x's idle TTL ran out; its stranded request has none
    session_ttl = 60
    stack = Stack(fast_settings(redis_url, session_ttl=session_ttl)).start(workers=0)  # nothing runs
    try:
        base = stack.base_url
        assert call("DELETE", f"{base}/v1/requests/{new(lost, 'chat-x')}")[0] == 200
        assert call("GET", f"{base}/v1/requests/{new(lost, 'chat-x')}")[1]["status"] == "cancelled"
        assert call("DELETE", f"{base}/v1/requests/{new(orphan, 'chat-gone')}")[0] == 200
        for key in (*x_keys, keys.session_meta("chat-gone"), keys.session_log("chat-gone")):
            assert r.pttl(key) == -2 or 0 < r.pttl(key) <= session_ttl * 1000, (key, r.pttl(key))
        assert call("DELETE", f"{base}/v1/requests/{new(alone, 'chat-y')}")[0] == 200
        for key in y_keys:
            assert 0 < r.pttl(key) <= session_ttl * 1000, (key, r.pttl(key))
        assert call("DELETE", f"{base}/v1/requests/{new(old['q1'], 'chat-a')}")[0] == 200  # not chat-a's head
        for key in (keys.session_meta("chat-a"), keys.session_log("chat-a"), keys.session_queue("chat-a")):
            assert r.pttl(key) == -1, key  # P and Q2 still wait
        assert r.lrange(keys.session_queue("chat-a"), 0, -1) == [new(old["p"], "chat-a"), new(old["q2"], "chat-a")]
    finally:
        stack.stop()
