"""`sluicegate migrate`, the review of 2026-12-07 (/tmp/rev-recovery): a rerun after the migrated session ran on in
the new version and expired there rewrites nothing (a mark the session's move leaves outlives it); a Redis
error is one `sluicegate migrate:` line, exit code 1, and a rerun finishes; an old key of another type is
a line and kept, the rest moves; a dry run with old workers still running says the real run would refuse."""

from __future__ import annotations

import io

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sluicegate import migrate as mig
from sluicegate.cli import main as cli_main
from sluicegate.sessions import keys
from tests.helpers import ON_CLUSTER, Stack, fast_settings, wait_for
from tests.test_migrate import new, old_keys_left, write_old_deployment
from tests.test_migrate_safety import ARGV, OLD_CONTROL_PLANE, die_in_step_4, run_cli, status


def marks(r: redis.Redis) -> list[str]:
    return sorted(r.scan_iter(match="sg:{s:*}:migrated:*", count=1000))


def mark(sid: str) -> str:
    """The key migrate leaves for a session it moved (sluicegate/migrate.py migrated_mark)."""
    return f"{keys.session_prefix(sid)}migrated:{sid}"


def test_a_rerun_after_the_migrated_session_ran_and_expired_rewrites_nothing(
        redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old_deployment(r, head_status="preempted")
    die_in_step_4(redis_url, monkeypatch)  # chat-a moved (steps 1-3), its old keys kept
    q2 = new(old["q2"], "chat-a")
    stack = Stack(fast_settings(redis_url, session_ttl=1)).start(workers=1)  # the new version runs chat-a on
    try:
        wait_for(lambda: status(stack.base_url, q2) == "done", timeout=30, what="q2 done")
        assert int(r.hget(keys.session_meta("chat-a"), "seq")) > old["last_a"] + 1
        wait_for(lambda: not r.exists(keys.session_meta("chat-a"), keys.session_log("chat-a"), keys.request(q2)),
                 timeout=30, what="chat-a expired in the new layout")
    finally:
        stack.stop()
    code, err = run_cli(redis_url, capsys)
    assert r.lrange(keys.session_queue("chat-a"), 0, -1) == []  # old: the 3 ended requests queued again
    assert not r.exists(keys.session_meta("chat-a"), keys.session_log("chat-a"), keys.request(q2))  # old: seq 14
    assert code == 1 and len(err) == 1 and "'chat-a'" in err[0] and "expired" in err[0], (code, err)  # old: 0, []
    assert {f"sg:s:chat-a:{s}" for s in "mql"} <= set(old_keys_left(r))  # kept, for the operator
    assert r.exists(keys.session_meta("chat-b")) and not r.exists("sg:s:chat-b:m")  # chat-b: moved this time
    assert not any(r.exists(key) for key in OLD_CONTROL_PLANE)
    assert marks(r) == [mark("chat-a")] and r.get(mark("chat-a")) == str(old["last_a"])  # chat-b's went with its keys
    r.delete(*old_keys_left(r))  # the operator checked the session and deleted its old keys by hand
    assert run_cli(redis_url, capsys) == (0, [])
    assert marks(r) == []  # a mark with no old keys left is swept


def test_the_mark_goes_with_the_old_keys(redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    write_old_deployment(r, head_status="running")
    die_in_step_4(redis_url, monkeypatch)
    assert marks(r) == [mark("chat-a")] and mig.migrated_mark("chat-a") == mark("chat-a")  # old: none
    summary = mig.migrate(redis_url, cluster=ON_CLUSTER, out=io.StringIO())
    assert summary.problems() == [] and old_keys_left(r) == [] and marks(r) == []


def test_a_store_error_is_one_line_and_a_rerun_finishes(redis_url: str, r: redis.Redis,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old_deployment(r, head_status="preempted")

    async def failing(self: mig.Migration, sid: str, requests: list[mig.OldRequest]) -> None:
        raise RedisConnectionError("Connection closed by server.")
    real = mig.Migration.write_aliases
    monkeypatch.setattr(mig.Migration, "write_aliases", failing)
    code, err = run_cli(redis_url, capsys)  # old: the ConnectionError raised out of main (a traceback)
    assert code == 1 and len(err) == 1, (code, err)
    assert err[0].startswith("sluicegate migrate: the store failed part-way (") and "run it again" in err[0], err
    assert "Connection closed by server." in err[0] and r.get(mig.LOCK) is None
    monkeypatch.setattr(mig.Migration, "write_aliases", real)
    assert run_cli(redis_url, capsys) == (0, [])
    assert old_keys_left(r) == [] and r.get(f"sg:alias:{old['q2']}") == new(old["q2"], "chat-a")


def test_an_old_key_of_another_type_is_a_line_and_kept(redis_url: str, r: redis.Redis,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    old = write_old_deployment(r, head_status="running")
    r.rpush("sg:r:stray", "x")  # a list under the old request prefix
    r.set("sg:s:chat-odd:m", "x")  # a session's meta that is not a hash
    r.rpush("sg:s:chat-odd:l", "1|queued|abc|{}")
    code, err = run_cli(redis_url, capsys)  # old: ResponseError (HMGET sg:r:stray) raised out of main
    assert code == 1 and len(err) == 2, (code, err)
    assert any("'chat-odd'" in line and "type" in line for line in err), err
    assert any("sg:r:stray" in line and "not a hash" in line for line in err), err
    assert set(old_keys_left(r)) == {"sg:r:stray", "sg:s:chat-odd:m", "sg:s:chat-odd:l"}
    assert r.lrange(keys.session_queue("chat-a"), 0, -1) == [new(old[n], "chat-a") for n in ("p", "q1", "q2")]
    assert not any(r.exists(key) for key in OLD_CONTROL_PLANE)


def test_a_dry_run_with_old_workers_running_says_the_run_would_refuse(redis_url: str, r: redis.Redis,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    write_old_deployment(r, head_status="running")
    r.set("sg:w:w-live", 1, px=60_000)
    code = cli_main([*ARGV, "--redis-url", redis_url, "--dry-run"])
    dry = capsys.readouterr().err.splitlines()
    assert (code, len(dry)) == (1, 1) and "w-live" in dry[0], (code, dry)  # old: (0, 0): no word of it
    real_code, real = run_cli(redis_url, capsys)
    assert (real_code, real) == (1, dry)  # the same line as the real run's refusal
