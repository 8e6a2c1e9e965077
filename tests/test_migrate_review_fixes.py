"""`sluicegate migrate`, the review of 2026-12-07 (/tmp/rev/report-migrate.md): a deployment with no session left
keeps its groups' quotas; a submit an old API accepts between step 4's check and its deletes is kept and
reported; a run that dies part-way through the deletes leaves nothing a rerun takes for a conflict; a lock
renewal that fails is tried again, and a run that cannot renew its lock stops before its sweep."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.exceptions import ConnectionError as RedisConnectionError

from sluicegate import migrate as mig
from sluicegate.cli import main as cli_main
from sluicegate.sessions import keys
from tests.helpers import ON_CLUSTER
from tests.test_migrate import GROUP, TENANT, WEIGHT, new, old_id, old_keys_left, write_old_deployment
from tests.test_migrate_safety import ARGV, OLD_CONTROL_PLANE, depths


def run_cli(redis_url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], list[str]]:
    """`sluicegate migrate`: its exit code, its summary line and its lines on stderr."""
    code = cli_main([*ARGV, "--redis-url", redis_url])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    return code, json.loads(lines[-1]) if lines else {}, captured.err.splitlines()


def old_submit(r: redis.Redis, sid: str) -> str:
    """What the old API's submit writes to a session that has a queue: its `queued` event, queue entry, hash and
    input (one key a command)."""
    rid = old_id()
    seq = r.hincrby(f"sg:s:{sid}:m", "seq", 1)
    r.rpush(f"sg:s:{sid}:l", f"{seq}|queued|{rid}|" + json.dumps({"request_id": rid, "priority": 5, "position": 3}))
    position = r.rpush(f"sg:s:{sid}:q", rid)
    r.hset(f"sg:r:{rid}", mapping={"sid": sid, "tn": TENANT, "g": GROUP, "p": 5, "ep": 5, "mt": 5, "ik": "p",
                                   "pa": "{}", "it": 1, "st": "queued", "sub": 1, "n": 0, "a": 0, "fs": seq})
    r.set(f"sg:r:{rid}:in", f"accepted with 202 at position {position - 1}")
    return rid


def fail_renewals(monkeypatch: pytest.MonkeyPatch, times: int) -> list[str]:
    """The lock's next `times` renewals fail as a dropped connection does (the command raises)."""
    failures: list[str] = []
    for cls in (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster):
        def eval_(self: Any, script: str, numkeys: int, *args: Any, _real: Any = cls.eval) -> Any:
            if script == mig.RENEW_LOCK and len(failures) < times:
                failures.append("renewal")

                async def dropped() -> Any:
                    raise RedisConnectionError("a renewal's connection dropped")
                return dropped()
            return _real(self, script, numkeys, *args)
        monkeypatch.setattr(cls, "eval", eval_)
    return failures


def test_a_deployment_with_no_session_left_keeps_its_quotas(redis_url: str, r: redis.Redis,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Every session expired while the old stack was stopped: groups, a quota, a weight and leftovers remain."""
    r.sadd("sg:groups", GROUP)
    r.hset("sg:tenants", TENANT, WEIGHT)
    r.hset(f"sg:g:{GROUP}:cfg", "max_concurrency", 1)
    r.hset(f"sg:g:{GROUP}:vtc", TENANT, 12)
    r.hset("sg:m:requests", f"{GROUP}|5|{TENANT}|submitted", 5)
    dry = mig.migrate(redis_url, cluster=ON_CLUSTER, dry_run=True, out=io.StringIO())
    assert (dry.quotas, dry.groups) == (1, [GROUP]), dry  # old: (0, []): the dry run did not warn either
    code, summary, err = run_cli(redis_url, capsys)
    assert (code, err) == (0, [])
    assert r.hgetall(keys.group_key(GROUP, "cfg")) == {"max_concurrency": "1"}  # old: {}, the old cfg swept
    assert (summary["quotas"], summary["groups"]) == (1, [GROUP]), summary
    assert float(r.hget(keys.group_key(GROUP, "tw"), TENANT)) == WEIGHT
    assert old_keys_left(r) == []


@pytest.mark.single_server  # the old layout, and an old API writing to it, ran on one server only (its scripts take
# keys of many slots): no old API can write to a cluster while migrate runs, and step 4 there is one key a command
def test_a_submit_between_the_check_and_the_deletes_is_kept_and_reported(
        redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An old API still running accepts a submit to chat-a right after migrate checked that chat-a's old log is
    as it read it, before its old keys are deleted: they are kept, with the late request, and reported (exit 1)."""
    old = write_old_deployment(r, head_status="preempted")
    late: list[str] = []
    real_llen = redis.asyncio.Redis.llen

    def llen(self: Any, name: str) -> Any:  # the check reads the old log's length (a pipeline inherits this)
        if name != "sg:s:chat-a:l" or late:
            return real_llen(self, name)

        async def then_a_submit() -> Any:
            length = await real_llen(self, name)
            late.append(old_submit(r, "chat-a"))
            return length
        return then_a_submit()
    monkeypatch.setattr(redis.asyncio.Redis, "llen", llen)
    code, summary, err = run_cli(redis_url, capsys)
    assert late, "the check was never made"
    assert late[0] in r.lrange("sg:s:chat-a:q", 0, -1), "deleted"  # old: chat-a's old keys deleted, late's with them
    assert r.exists(f"sg:r:{late[0]}") and r.exists(f"sg:r:{late[0]}:in")
    assert r.llen("sg:s:chat-a:l") == old["last_a"] + 1 and r.exists("sg:s:chat-a:m")
    assert not r.exists(keys.request(new(late[0], "chat-a")))  # not copied as a stranded request
    assert code == 1 and len(err) == 1 and "'chat-a'" in err[0] and "written in the old layout" in err[0], err
    assert summary["stranded"] == 0 and "chat-a" in summary["conflicts"], summary
    assert r.exists(keys.session_meta("chat-b")) and not r.exists("sg:s:chat-b:m")  # the rest moved
    assert not any(r.exists(key) for key in OLD_CONTROL_PLANE)


def test_a_rerun_after_dying_part_way_through_the_deletes_finishes_the_job(
        redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A run's connection drops after its first DEL went through: a rerun finishes (exit 0), with no conflict."""
    old = write_old_deployment(r, head_status="preempted")
    sessions = {sid: [f"sg:s:{sid}:{s}" for s in "mql" if r.exists(f"sg:s:{sid}:{s}")] for sid in ("chat-a", "chat-b")}
    real_delete = mig.Migration.delete
    died: list[str] = []

    async def partial_delete(self: mig.Migration, names: list[str]) -> None:
        if died or not names:
            return await real_delete(self, names)
        died.append(names[0])
        await real_delete(self, names[:1])
        raise ConnectionError("the connection dropped after the first DEL")
    monkeypatch.setattr(mig.Migration, "delete", partial_delete)
    with pytest.raises(ConnectionError):
        mig.migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    monkeypatch.setattr(mig.Migration, "delete", real_delete)
    if ON_CLUSTER:  # the keys go one a command there: the run died inside chat-a's step 4
        assert died[0].startswith("sg:s:chat-a:"), died
    left = {sid: sum(r.exists(name) for name in names) for sid, names in sessions.items()}
    log = r.lrange(keys.session_log("chat-a"), 0, -1)
    dry = mig.migrate(redis_url, cluster=ON_CLUSTER, dry_run=True, out=io.StringIO())
    code, summary, err = run_cli(redis_url, capsys)
    assert (code, err) == (0, []), err  # old: 1, "session 'chat-a' not migrated: the new layout already holds it"
    assert dry.problems() == [], dry.problems()
    assert summary["conflicts"] == {} and old_keys_left(r) == []
    if not ON_CLUSTER:  # one transaction a session: the run left all of a session's old keys or none
        assert all(left[sid] in (0, len(names)) for sid, names in sessions.items()), left
    assert r.lrange(keys.session_queue("chat-a"), 0, -1) == [new(old[n], "chat-a") for n in ("p", "q1", "q2")]
    assert r.lrange(keys.session_log("chat-a"), 0, -1) == log
    assert depths(r) == {f"depth|{GROUP}|5|{TENANT}": 3}
    assert r.get(f"sg:alias:{old['q2']}") == new(old["q2"], "chat-a")


def test_a_lock_renewal_that_fails_is_tried_again(redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    write_old_deployment(r, head_status="preempted")
    monkeypatch.setattr(mig, "LOCK_MS", 600)  # renewed every 200 ms
    failures = fail_renewals(monkeypatch, times=1)
    held: list[tuple[bool, bool]] = []
    real_move = mig.Migration.move

    async def slow_move(self: mig.Migration, plan: mig.SessionPlan, *, orphan: bool) -> None:
        await asyncio.sleep(1.0)  # past the lock's TTL: it holds only if renewed after the failure
        held.append((r.get(mig.LOCK) == self.run_id, self.lock_lost))
        await real_move(self, plan, orphan=orphan)
    monkeypatch.setattr(mig.Migration, "move", slow_move)
    code, _, err = run_cli(redis_url, capsys)
    assert failures == ["renewal"]
    assert len(held) == 2 and all(h == (True, False) for h in held), held  # old: (False, False): lapsed, unnoticed
    assert (code, err) == (0, [])
    assert old_keys_left(r) == [] and r.get(mig.LOCK) is None


def test_a_run_that_cannot_renew_its_lock_stops_before_the_sweep(
        redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write_old_deployment(r, head_status="preempted")
    monkeypatch.setattr(mig, "LOCK_MS", 600)
    fail_renewals(monkeypatch, times=1_000_000)  # every renewal fails: the lock lapses
    real_move = mig.Migration.move

    async def move(self: mig.Migration, plan: mig.SessionPlan, *, orphan: bool) -> None:
        await real_move(self, plan, orphan=orphan)
        if plan.sid == "chat-b":  # the last session: the lock lapses while it is moved
            await asyncio.sleep(1.5)
    monkeypatch.setattr(mig.Migration, "move", move)
    code, _, err = run_cli(redis_url, capsys)
    assert code == 1 and len(err) == 1 and "lost its lock" in err[0], err  # old: 0, swept without the lock
    assert all(r.exists(key) for key in OLD_CONTROL_PLANE)  # no sweep
    monkeypatch.undo()
    code, summary, err = run_cli(redis_url, capsys)  # a rerun finishes the job
    assert (code, err) == (0, []) and summary["conflicts"] == {} and old_keys_left(r) == []
    assert depths(r) == {f"depth|{GROUP}|5|{TENANT}": 3}
