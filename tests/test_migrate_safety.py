"""`sluicegate migrate` never overwrites what the new version wrote: a session of the same id it already holds, or
a migrated session it ran on after a run of migrate died half-way, is left alone (old keys kept, one line
each, exit code 1). Sessions an old API still writes while migrate runs are moved by further passes, never
swept unmigrated. A second run at once refuses (a run lock with a TTL). A migrated head is ready with its
`queued` event's id (fs), as the control plane's own ready specs are."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
import redis

from sluicegate import migrate as mig
from sluicegate.cli import main as cli_main
from sluicegate.sessions import keys
from tests.helpers import ON_CLUSTER, Stack, call, fast_settings, submit, wait_for
from tests.metrics_helpers import raw_depths
from tests.test_migrate import GROUP, TENANT, OldDeployment, new, old_id, old_keys_left, snapshot, write_old_deployment

ARGV = ["migrate", *(["--redis-cluster"] if ON_CLUSTER else [])]
OLD_CONTROL_PLANE = (f"sg:g:{GROUP}:cls", "sg:leases", "sg:workers", "sg:m:depth")


def run_cli(redis_url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = cli_main([*ARGV, "--redis-url", redis_url])
    return code, capsys.readouterr().err.splitlines()


def status(base: str, rid: str) -> str:
    return call("GET", f"{base}/v1/requests/{rid}")[1].get("status", "missing")


def depths(r: redis.Redis) -> dict[str, float]:
    return {label: n for label, n in raw_depths(r, [GROUP]).items() if n}


def die_in_step_4(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of migrate dies deleting its first session's old keys (steps 1 to 3 done), before any is gone
    (on one server step 4 is one transaction: a death leaves all of them or none)."""
    real_delete = mig.Migration.delete_session

    async def dying_delete(self: mig.Migration, plan: mig.SessionPlan, *, orphan: bool) -> bool:
        raise ConnectionError("killed in step 4")
    monkeypatch.setattr(mig.Migration, "delete_session", dying_delete)
    with pytest.raises(ConnectionError):
        mig.migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    monkeypatch.setattr(mig.Migration, "delete_session", real_delete)


def test_a_session_the_new_version_already_wrote_is_left_alone(redis_url: str, r: redis.Redis,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0)  # the new version started too early: nothing runs
    try:
        x = submit(stack.base_url, "chat-a", tenant=TENANT, max_tokens=5)
    finally:
        stack.stop()
    new_keys = (keys.session_meta("chat-a"), keys.session_log("chat-a"), keys.session_queue("chat-a"), keys.request(x))
    before = {key: (r.type(key), snapshot(r)[key][1]) for key in new_keys}
    old = write_old_deployment(r, head_status="preempted")
    dry = snapshot(r)
    assert cli_main([*ARGV, "--redis-url", redis_url, "--dry-run"]) == 1  # old: 0
    assert snapshot(r) == dry and "'chat-a'" in capsys.readouterr().err
    code, err = run_cli(redis_url, capsys)
    assert {key: (r.type(key), snapshot(r)[key][1]) for key in new_keys} == before  # old: X's session overwritten
    assert code == 1
    assert len(err) == 1 and "'chat-a'" in err[0] and "already holds it" in err[0] and "kept" in err[0], err
    left = old_keys_left(r)  # chat-a's old keys, all of them; the rest migrated and swept
    assert set(left) == {f"sg:s:chat-a:{s}" for s in "mql"} | {f"sg:r:{old[n]}" for n in ("e1", "p", "q1", "q2")} | {
        f"sg:r:{old[n]}:in" for n in ("p", "q1", "q2")}, left
    assert r.get(f"sg:alias:{old['p']}") is None
    assert r.get(f"sg:alias:{old['e2']}") == new(old["e2"], "chat-b")
    assert depths(r) == {f"depth|{GROUP}|5|{TENANT}": 1}  # X's only
    again = snapshot(r)
    assert run_cli(redis_url, capsys)[0] == 1 and snapshot(r) == again  # a rerun changes nothing


def test_a_rerun_after_the_new_version_ran_a_migrated_session_rewinds_nothing(
        redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old_deployment(r, head_status="preempted")
    die_in_step_4(redis_url, monkeypatch)
    q2 = new(old["q2"], "chat-a")
    stack = Stack(fast_settings(redis_url)).start(workers=1)  # the new version started: chat-a runs on
    try:
        wait_for(lambda: status(stack.base_url, q2) == "done", timeout=30, what="q2 done")
    finally:
        stack.stop()
    log = r.lrange(keys.session_log("chat-a"), 0, -1)
    seq = r.hget(keys.session_meta("chat-a"), "seq")
    code, err = run_cli(redis_url, capsys)
    assert r.lrange(keys.session_log("chat-a"), 0, -1) == log  # old: rewound to the 14 migrated events
    assert r.hget(keys.session_meta("chat-a"), "seq") == seq
    assert r.hget(keys.request(q2), "st") == "done" and r.lrange(keys.session_queue("chat-a"), 0, -1) == []
    assert code == 1 and len(err) == 1 and "'chat-a'" in err[0], err
    assert r.exists(keys.session_meta("chat-b")) and not r.exists("sg:s:chat-b:m")  # chat-b: moved this time
    assert not any(r.exists(key) for key in OLD_CONTROL_PLANE)


def test_a_rerun_after_dying_half_way_finishes_the_job(redis_url: str, r: redis.Redis,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing ran in between: the session written by the run that died is taken as written (not rewritten,
    not counted again) and its old keys go."""
    old = write_old_deployment(r, head_status="running")
    die_in_step_4(redis_url, monkeypatch)
    log = r.lrange(keys.session_log("chat-a"), 0, -1)
    summary = mig.migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    assert (summary.sessions, summary.queued, summary.interrupted) == (2, 3, 1)
    assert old_keys_left(r) == [] and r.lrange(keys.session_log("chat-a"), 0, -1) == log
    assert r.lrange(keys.session_queue("chat-a"), 0, -1) == [new(old[n], "chat-a") for n in ("p", "q1", "q2")]
    assert depths(r) == {f"depth|{GROUP}|5|{TENANT}": 3}


def test_a_migrated_head_is_ready_with_its_queued_event_id(redis_url: str, r: redis.Redis,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The ready spec carries fs (a ready of an earlier head, arriving late, must not replace a later one:
    scheduler/lua/includes/dispatch.lua `ready`); the head is then dispatched and runs."""
    old = write_old_deployment(r, head_status="preempted")
    answers: list[Any] = []
    real = mig.Migration.fcall

    async def fcall(self: mig.Migration, name: str, keys_: list[str], args: list[Any]) -> Any:
        answers.append(await real(self, name, keys_, args))
        return answers[-1]
    monkeypatch.setattr(mig.Migration, "fcall", fcall)
    mig.migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    stored = r.hget(keys.group_key(GROUP, "rq"), "chat-a")
    p = new(old["p"], "chat-a")
    assert stored is not None and stored.split("|")[0] == p
    assert stored.split("|")[6] == r.hget(keys.request(p), "fs") == "7", stored  # old: '' (no fs)
    assert answers == ["ready"]
    stack = Stack(fast_settings(redis_url)).start(workers=1)
    try:
        wait_for(lambda: status(stack.base_url, p) == "done", timeout=30, what="the migrated head done")
    finally:
        stack.stop()


def write_late_session(r: redis.Redis, sid: str) -> str:
    """What the old API's submit writes for a new session (one queued request)."""
    rid = old_id()
    deployment = OldDeployment(r)
    deployment.session(sid, [("queued", rid, {"request_id": rid, "priority": 5, "position": 0})], queue=[rid])
    deployment.request(rid, sid, status="queued", max_tokens=5, fs=1, prompt="accepted with 202")
    return rid


def test_a_session_written_while_migrate_runs_is_moved_not_swept(redis_url: str, r: redis.Redis,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_old_deployment(r, head_status="preempted")
    real_move = mig.Migration.move
    late: list[str] = []

    async def move(self: mig.Migration, plan: mig.SessionPlan, *, orphan: bool) -> None:
        await real_move(self, plan, orphan=orphan)
        if plan.sid == "chat-a":  # an old API not yet stopped accepts a submit meanwhile
            late.append(write_late_session(r, "chat-late"))
    monkeypatch.setattr(mig.Migration, "move", move)
    summary = mig.migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    rid = new(late[0], "chat-late")
    assert r.get(f"sg:alias:{late[0]}") == rid  # old: its old keys swept, never moved
    assert r.lrange(keys.session_queue("chat-late"), 0, -1) == [rid] and r.hget(keys.request(rid), "st") == "queued"
    assert old_keys_left(r) == [] and summary.problems() == [] and summary.sessions == 3
    assert depths(r) == {f"depth|{GROUP}|5|{TENANT}": 4}


def test_sessions_still_written_after_the_last_pass_are_kept_and_reported(
        redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write_old_deployment(r, head_status="preempted")
    real_move = mig.Migration.move
    late: list[str] = []

    async def move(self: mig.Migration, plan: mig.SessionPlan, *, orphan: bool) -> None:
        await real_move(self, plan, orphan=orphan)
        late.append(write_late_session(r, f"chat-late-{len(late)}"))  # an old API that never stops
    monkeypatch.setattr(mig.Migration, "move", move)
    code, err = run_cli(redis_url, capsys)
    # each pass moves the sessions the one before wrote (two), which write two more: the last pass's are left
    left = {f"chat-late-{i}": rid for i, rid in enumerate(late)}
    left = {sid: rid for sid, rid in left.items() if int(sid.rsplit("-", 1)[1]) >= len(late) - 2}
    for sid, rid in left.items():
        assert r.exists(f"sg:s:{sid}:m", f"sg:s:{sid}:q", f"sg:s:{sid}:l", f"sg:r:{rid}", f"sg:r:{rid}:in") == 5, sid
    assert len(late) == 2 * mig.MAX_PASSES  # old: one pass, and the two sessions it left were swept
    assert code == 1 and len(err) == 1 and "old layout" in err[0] and all(sid in err[0] for sid in left), err
    assert not any(r.exists(key) for key in OLD_CONTROL_PLANE)
    assert r.get(f"sg:alias:{late[-3]}") == new(late[-3], f"chat-late-{len(late) - 3}")
    assert set(old_keys_left(r)) == {key for sid, rid in left.items()
                                     for key in (*(f"sg:s:{sid}:{s}" for s in "mql"), f"sg:r:{rid}", f"sg:r:{rid}:in")}


def test_two_runs_at_once_count_each_request_once(redis_url: str, r: redis.Redis) -> None:
    write_old_deployment(r, head_status="preempted")

    async def both() -> list[Any]:
        runs = (mig.migrate_async(redis_url, cluster=ON_CLUSTER, out=io.StringIO()) for _ in range(2))
        return await asyncio.gather(*runs, return_exceptions=True)
    results = asyncio.run(both())
    assert depths(r) == {f"depth|{GROUP}|5|{TENANT}": 3}, results  # old: 6
    refused = [x for x in results if isinstance(x, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], mig.MigrationLocked), results
    assert old_keys_left(r) == [] and r.get(mig.LOCK) is None


def test_a_run_refuses_while_another_holds_the_lock(redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    write_old_deployment(r, head_status="preempted")
    r.set("sg:migrate-lock", "another-run", px=60_000)
    before = snapshot(r)
    code, err = run_cli(redis_url, capsys)
    assert code == 1 and len(err) == 1 and "lock" in err[0], err  # old: 0, migrated alongside the other
    assert snapshot(r) == before
    r.delete("sg:migrate-lock")
    monkeypatch.setattr(mig, "LOCK_MS", 300)  # renewed every 100 ms
    held: list[tuple[str | None, int]] = []
    real_move = mig.Migration.move

    async def slow_move(self: mig.Migration, plan: mig.SessionPlan, *, orphan: bool) -> None:
        await asyncio.sleep(0.6)  # past the lock's TTL: it holds only if renewed
        held.append((r.get("sg:migrate-lock"), r.pttl("sg:migrate-lock")))
        await real_move(self, plan, orphan=orphan)
    monkeypatch.setattr(mig.Migration, "move", slow_move)
    assert run_cli(redis_url, capsys) == (0, [])
    assert held and all(value is not None and 0 < ttl <= 300 for value, ttl in held), held
    assert r.get("sg:migrate-lock") is None and old_keys_left(r) == []


def test_a_submit_to_a_session_migrate_is_moving_is_kept_and_reported(redis_url: str, r: redis.Redis,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An old API still running accepts a submit to a session between its move (steps 1-3) and the delete of
    its old keys: those keys are kept (with the late request) and the run reports the session (exit 1),
    where they were deleted, the late request stranded in no queue, and the run ended 0."""
    write_old_deployment(r, head_status="preempted")
    late: list[str] = []
    real_aliases = mig.Migration.write_aliases

    async def write_aliases(self: mig.Migration, sid: str, requests: list[Any]) -> None:
        await real_aliases(self, sid, requests)
        if sid == "chat-a" and not late:  # the old API's submit: its `queued` event, queue entry, hash
            late.append(rid := old_id())
            seq = r.hincrby("sg:s:chat-a:m", "seq", 1)
            r.rpush("sg:s:chat-a:l", f"{seq}|queued|{rid}|" + json.dumps({"request_id": rid, "position": 3}))
            r.rpush("sg:s:chat-a:q", rid)
            r.hset(f"sg:r:{rid}", mapping={"sid": "chat-a", "tn": TENANT, "g": GROUP, "p": 5, "mt": 5, "st": "queued"})
    monkeypatch.setattr(mig.Migration, "write_aliases", write_aliases)
    summary = mig.migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    assert "chat-a" in summary.conflicts and any("chat-a" in line for line in summary.problems())
    assert late[0] in r.lrange("sg:s:chat-a:q", 0, -1) and r.exists(f"sg:r:{late[0]}")


def test_a_rerun_keeps_a_quota_the_new_version_set(redis_url: str, r: redis.Redis,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_old_deployment(r, head_status="preempted")  # the old quota: max_concurrency 1
    die_in_step_4(redis_url, monkeypatch)
    r.hset(keys.group_key(GROUP, "cfg"), "max_concurrency", 4)  # the new version's operator raised it since
    mig.migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    assert r.hget(keys.group_key(GROUP, "cfg"), "max_concurrency") == "4"  # was put back to 1
