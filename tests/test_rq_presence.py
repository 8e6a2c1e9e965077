"""rq presence: a `sluicegate worker` process is an rq worker of queue `sluicegate.<group>` in rq's
registry (what `rq info` and rq-dashboard show operators), kept there by its heartbeats, and gone
after a graceful shutdown. Requests are never dispatched as rq jobs, but rq shows the ones a worker runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq import Worker as RqWorker
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from sluicegate.sessions import keys
from sluicegate.sessions.runs import RunSpec, shown_info
from sluicegate.workers.presence import RqPresence, rq_job_id
from sluicegate.workers.worker import RQ_SETTLE, Worker
from tests.helpers import Stack, call, fast_settings, submit, wait_for
from tests.worker_helpers import WorkerProcess

# rq has no cluster support (rq#1942): its presence lives on one server (on a cluster: --rq-redis-url).
pytestmark = pytest.mark.single_server


def rq_worker(url: str, name: str) -> RqWorker | None:
    connection = redis.Redis.from_url(url)
    try:
        return next((w for w in RqWorker.all(connection=connection) if w.name == name), None)
    finally:
        connection.close()


def test_worker_process_is_listed_by_rq_while_alive(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    settings = fast_settings(redis_url, group="gpu-a", slots=2, heartbeat_seconds=0.3)
    worker = WorkerProcess(settings, str(tmp_path / "worker.log"))
    try:
        wid = _registered_in(r, worker, "gpu-a")
        listed = wait_for(lambda: rq_worker(redis_url, wid), timeout=10, what="the worker in rq's registry")
        assert listed.queue_names() == ["sluicegate.gpu-a"]
        assert listed.get_state() == "idle"
        first: datetime = listed.last_heartbeat
        wait_for(lambda: (w := rq_worker(redis_url, wid)) is not None and w.last_heartbeat > first, timeout=10,
                 what="an rq heartbeat")
        assert 0 < r.ttl(listed.key) <= 70  # kept alive by heartbeats, gone soon after they stop

        rq_cli = shutil.which("rq", path=os.path.dirname(sys.executable))
        if rq_cli:  # the operators' view
            shown = subprocess.run([rq_cli, "info", "-W", "-u", redis_url], capture_output=True, text=True, timeout=30)
            assert wid in shown.stdout and "sluicegate.gpu-a" in shown.stdout, shown.stdout + shown.stderr

        # rq's registration lost (say Redis restarted empty): the next rq beat registers again
        r.delete(listed.key)
        r.srem("rq:workers", listed.key)
        wait_for(lambda: rq_worker(redis_url, wid) is not None, timeout=10, what="the rq registration to come back")

        worker.signal(signal.SIGTERM)
        assert worker.wait(15) == 0
        assert rq_worker(redis_url, wid) is None
        assert not r.hexists(keys.group_key("default", "workers"), wid)
    finally:
        worker.close()


def _registered_in(r: redis.Redis, worker: WorkerProcess, group: str) -> str:
    wid = worker.registered(r)
    assert shown_info(r.hget(keys.group_key(group, "workers"), wid))["slots"] == 2 and wid.startswith(f"{group}.")
    assert r.lrange(keys.group_key(group, "idle"), 0, -1) == [wid, wid]
    return wid


@pytest.mark.parametrize("standalone_rq", [False, True])
def test_on_a_cluster_rq_presence_goes_to_the_rq_server_or_is_off(redis_url: str, standalone_rq: bool) -> None:
    """rq has no cluster support: with --redis-cluster the presence uses --rq-redis-url (here the test's
    standalone server), and is off without it. The cluster URL is never dialled to build the worker."""
    settings = fast_settings("redis://127.0.0.1:2/0", redis_cluster=True,
                             rq_redis_url=redis_url if standalone_rq else None)
    worker = Worker(settings, use_rq=True)
    if not standalone_rq:
        assert worker.presence is None
    else:
        assert worker.presence is not None
        kwargs = worker.presence._connection.connection_pool.connection_kwargs
        assert f"redis://{kwargs['host']}:{kwargs['port']}/0" == redis_url


def rq_view(url: str, wid: str) -> dict[str, Any]:
    """What rq's own tooling reads of a worker: its state, the jobs of its current executions (rq-dashboard's
    current job) and the queue's StartedJobRegistry ("N executing" in `rq info`)."""
    connection = redis.Redis.from_url(url)
    try:
        for _ in range(20):  # a job the worker removes between rq's reads of an execution and of its job
            try:
                worker = next((w for w in RqWorker.all(connection=connection) if w.name == wid), None)
                assert worker is not None, f"worker {wid} is not in rq's registry"
                jobs = {e.job_id: e.job for e in worker.get_current_executions(refresh=True)}
                queue = Queue("sluicegate.default", connection=connection)
                return {"state": worker.get_state(), "jobs": jobs,
                        "started": set(queue.started_job_registry.get_job_ids()), "current": worker.get_current_job()}
            except NoSuchJobError:  # rq's tooling reads without a transaction: read again
                time.sleep(0.01)
        raise AssertionError(f"rq's view of worker {wid} kept changing under 20 reads")
    finally:
        connection.close()


def rq_info(url: str) -> str:
    rq_cli = shutil.which("rq", path=os.path.dirname(sys.executable))
    assert rq_cli, "the rq CLI is installed with rq"
    shown = subprocess.run([rq_cli, "info", "--raw", "-u", url, "sluicegate.default"], capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return shown.stdout


def test_rq_shows_the_requests_a_worker_runs_and_nothing_after(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    """A worker running requests is `busy` in rq with one started Job per request (its description names the
    request), in its execution index and the queue's StartedJobRegistry; idle again, with no rq record left
    behind, once they end. The records expire on their own: the Job hash first (see workers/presence.py)."""
    stack = Stack(fast_settings(redis_url, sim_tokens_per_second=100.0)).start(workers=0)
    worker = WorkerProcess(fast_settings(redis_url, sim_tokens_per_second=100.0, slots=2),
                           str(tmp_path / "worker.log"))
    try:
        wid = worker.registered(r)
        wait_for(lambda: rq_worker(redis_url, wid), timeout=10, what="the worker in rq's registry")
        assert rq_view(redis_url, wid)["state"] == "idle"

        long_one = submit(stack.base_url, "rq-a", max_tokens=400, tenant="acme")  # 4 s at 100 tokens/s
        short_one = submit(stack.base_url, "rq-b", max_tokens=250)
        both = {rq_job_id(long_one, "1"), rq_job_id(short_one, "1")}
        view = wait_for(lambda: (v := rq_view(redis_url, wid))["state"] == "busy" and set(v["jobs"]) == both and v,
                        timeout=5, what="rq to show the worker busy with both requests")
        assert view["started"] == both
        job = view["jobs"][rq_job_id(long_one, "1")]
        assert long_one in job.description and "session_id rq-a" in job.description and "acme" in job.description
        assert job.get_status() == "started" and job.worker_name == wid and job.origin == "sluicegate.default"
        assert job.meta["request_id"] == long_one
        assert view["current"] is not None and view["current"].id in both  # rq-dashboard's "current job"
        for member in r.smembers(f"rq:worker:{wid}:executions"):  # all expire, the Job hash first
            job_ttl, execution_ttl = r.ttl(f"rq:job:{member.split(':')[0]}"), r.ttl(f"rq:execution:{member}")
            assert 0 < job_ttl <= 10 and job_ttl < execution_ttl <= 15, (job_ttl, execution_ttl)
        shown = rq_info(redis_url)
        assert "2 executing" in shown and f"worker {wid}" in shown and "busy" in shown, shown

        code, _ = call("DELETE", f"{stack.base_url}/v1/requests/{long_one}")
        assert code in (200, 202)
        wait_for(lambda: set(rq_view(redis_url, wid)["jobs"]) == {rq_job_id(short_one, "1")}, timeout=5,
                 what="the cancelled request to leave rq's view")
        assert not r.exists(f"rq:job:{rq_job_id(long_one, '1')}")

        wait_for(lambda: call("GET", f"{stack.base_url}/v1/requests/{short_one}")[1]["status"] == "done", timeout=10,
                 what="the second request to end")
        view = wait_for(lambda: (v := rq_view(redis_url, wid))["state"] == "idle" and not v["jobs"] and v, timeout=5,
                        what="rq to show the worker idle again")
        assert view["started"] == set() and view["current"] is None
        shown = rq_info(redis_url)
        assert "0 executing" in shown and "idle" in shown, shown
        assert [k for k in r.scan_iter("rq:*") if "job" in k or "execution" in k or "wip" in k] == []
    finally:
        worker.close()
        stack.stop()


def test_a_beat_renews_only_the_records_that_would_expire_before_the_next_one(redis_url: str, r: redis.Redis) -> None:
    """A run shorter than about half the TTL is never renewed; one about to expire is, to the full TTL."""
    presence = RqPresence(redis_url, group="default", worker_id="default.beat.1.aaaaaa", ttl_seconds=10)
    try:
        presence.birth()
        runs = {f"r{i}|1": {"request_id": f"r{i}", "attempt": "1"} for i in range(2)}
        presence.show(runs)
        old, young = (f"rq:job:{rq_job_id(f'r{i}', '1')}" for i in range(2))
        assert r.exists(old, young) == 2
        for key in (old, young):
            r.expire(key, 2)  # both close to expiring in Redis; only `old` is so by the presence's account
        presence._shown["r0|1"].expires_at = time.monotonic() + 1
        presence._next_beat = 0  # a beat is due
        presence.show(runs)
        assert 8 <= r.ttl(old) <= 10 and r.ttl(young) <= 2
        shown = presence._shown["r0|1"]
        execution = Execution.fetch(shown.execution_id, shown.job_id, connection=redis.Redis.from_url(redis_url))
        assert 10 < r.ttl(execution.key) <= 15  # the execution outlives its Job hash (module doc)
        listed = StartedJobRegistry("sluicegate.default", connection=r).get_job_and_execution_ids(cleanup=False)
        assert sorted(listed) == sorted((s.job_id, s.execution_id) for s in presence._shown.values())
    finally:
        presence.death()
    assert r.exists(old, young) == 0


def test_the_script_writes_what_rq_itself_writes_for_a_started_job(redis_url: str, r: redis.Redis) -> None:
    """The presence writes rq's records by script (workers/lua/rq_show.lua), not through rq's objects:
    the same keys, fields, types and expiries as rq's own Job.save and Execution.create, and rq's
    Execution.delete finds nothing of them left to delete."""
    raw = redis.Redis.from_url(redis_url)
    presence = RqPresence(redis_url, group="default", worker_id="default.same.1.aaaaaa", ttl_seconds=10)
    try:
        presence.birth()
        presence.show({"ours|1": {"request_id": "ours", "attempt": "1", "tenant": "acme"}})
        queue = Queue("sluicegate.default", connection=raw)
        theirs = Job.create("sluicegate.request", connection=raw, id="theirs-a1", origin=queue.name,
                            status=JobStatus.STARTED, timeout=-1, description="d", meta={"request_id": "theirs"})
        theirs.worker_name = "default.same.1.aaaaaa"
        theirs.started_at = datetime.now()
        with raw.pipeline(transaction=False) as pipe:
            theirs.save(pipeline=pipe)
            pipe.expire(theirs.key, 10)
            execution = Execution.create(theirs, ttl=15, pipeline=pipe, worker_name="default.same.1.aaaaaa")
            pipe.execute()

        def records(job_id: str, execution_id: str) -> dict[str, Any]:
            found = {}
            for key in raw.scan_iter("rq:*"):
                name = key.decode()
                if job_id in name and name.replace(job_id, "J").replace(execution_id, "E") != name:
                    kind = raw.type(key).decode()
                    fields = sorted(raw.hkeys(key)) if kind == "hash" else None
                    ttl = raw.ttl(key)
                    found[name.replace(job_id, "J").replace(execution_id, "E")] = (kind, fields, ttl > 0)
            return found

        ours = presence._shown["ours|1"]
        assert records(ours.job_id, ours.execution_id) == records("theirs-a1", execution.id)
        started = {m.decode() for m in raw.zrange("rq:wip:sluicegate.default", 0, -1)}
        assert started == {f"{ours.job_id}:{ours.execution_id}", f"theirs-a1:{execution.id}"}
        assert raw.smembers("rq:worker:default.same.1.aaaaaa:executions") == {m.encode() for m in started}
        job = Job.fetch(ours.job_id, connection=raw)
        assert (job.get_status(), job.origin, job.worker_name, job.meta["tenant"], job.func_name) == (
            "started", "sluicegate.default", "default.same.1.aaaaaa", "acme", "sluicegate.request")
        assert job.started_at is not None and job.created_at is not None
        presence.show({})
        assert not raw.exists(f"rq:job:{ours.job_id}") and records(ours.job_id, ours.execution_id) == {}
        assert {m.decode() for m in raw.zrange("rq:wip:sluicegate.default", 0, -1)} == {f"theirs-a1:{execution.id}"}
    finally:
        presence.death()


def test_a_write_resent_or_a_registration_lost_leaves_no_second_set_of_records(redis_url: str, r: redis.Redis) -> None:
    """A write whose reply was lost is made again with the same execution ids (not a second set that
    rq's cleanup would later mark failed); registering again deletes the records of runs gone meanwhile."""
    presence = RqPresence(redis_url, group="default", worker_id="default.again.1.aaaaaa", ttl_seconds=10)
    wip = "rq:wip:sluicegate.default"
    try:
        presence.birth()
        runs = {f"r{i}|1": {"request_id": f"r{i}", "attempt": "1"} for i in range(2)}
        presence.show(runs)
        first = set(r.zrange(wip, 0, -1))
        presence._shown.clear()  # as if the reply was lost: the presence does not know it wrote them
        presence.show(runs)
        assert set(r.zrange(wip, 0, -1)) == first and len(first) == 2
        assert r.scard("rq:worker:default.again.1.aaaaaa:executions") == 2

        r.delete("rq:worker:default.again.1.aaaaaa")  # the registration lapsed; r1 ended meanwhile
        presence._next_beat = 0
        presence.show({"r0|1": runs["r0|1"]})
        assert r.exists("rq:worker:default.again.1.aaaaaa")
        assert [m.split(":")[0] for m in r.zrange(wip, 0, -1)] == [rq_job_id("r0", "1")]
        assert not r.exists(f"rq:job:{rq_job_id('r1', '1')}") and r.exists(f"rq:job:{rq_job_id('r0', '1')}")
    finally:
        presence.death()
    assert r.zcard(wip) == 0


def test_rq_is_shown_only_runs_older_than_the_settle_time_and_never_a_shorter_one(redis_url: str,
                                                                                  r: redis.Redis) -> None:
    """rq is told of a run once it has run RQ_SETTLE s, never while it waits for its first token (a
    redis-py call beside the event loop, a script in Valkey ahead of the first append): not even when
    another run's change is written meanwhile. A run that ends sooner is never written; one that lasts
    is shown as rq shows a started job."""
    worker = Worker(fast_settings(redis_url), use_rq=True)
    presence = worker.presence
    assert presence is not None
    writes: list[tuple[float, set[str]]] = []
    show = presence.show

    def recorded(runs: dict[str, dict[str, Any]]) -> None:
        writes.append((time.monotonic(), set(runs)))
        show(runs)

    presence.show = recorded  # type: ignore[method-assign]
    started: dict[str, float] = {}

    def start(rid: str) -> None:
        started[f"{rid}|1"] = time.monotonic()
        worker._show_in_rq(f"{rid}|1", RunSpec.from_fields(rid, "1", {"sid": f"s-{rid}", "g": "default",
                                                                       "tn": "acme", "p": "5", "mt": "4"}))

    async def until_shown(key: str) -> None:
        async with asyncio.timeout(5):
            while not any(key in runs for _, runs in writes):
                await asyncio.sleep(0.005)

    async def scenario() -> None:
        presence.birth()
        loop = asyncio.create_task(worker._presence_loop())
        try:
            start("ab1")
            await asyncio.sleep(RQ_SETTLE / 5)
            worker._show_in_rq("ab1|1", None)  # ended well within the settle time
            await asyncio.sleep(RQ_SETTLE * 3)
            start("ab2")
            await asyncio.sleep(RQ_SETTLE * 0.8)
            start("ab3")  # its start is pending when ab2's is written
            await until_shown("ab2|1")
            assert r.hget(f"rq:job:{rq_job_id('ab2', '1')}", "status") == "started"
            await until_shown("ab3|1")
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            presence.death()
            await worker.store.aclose()

    asyncio.run(scenario())
    assert all("ab1|1" not in runs for _, runs in writes), writes
    assert not r.exists(f"rq:job:{rq_job_id('ab1', '1')}")
    for at, runs in writes:  # nothing written younger than the settle time
        assert all(at - started[key] >= RQ_SETTLE * 0.9 for key in runs), (at, runs, started)
    first_of = {key: next(at for at, runs in writes if key in runs) for key in ("ab2|1", "ab3|1")}
    assert first_of["ab3|1"] > first_of["ab2|1"]  # ab3 was pending, too young, when ab2 was written


def test_a_runs_start_wakes_no_task_before_the_settle_time(redis_url: str) -> None:
    """A run's start is on its way from the inbox to its engine call: it only notes the run. Waking the
    presence loop there, to sleep out the settle time, took two task steps off that way; the loop is
    woken once the change falls due, with every change made meanwhile."""
    worker = Worker(fast_settings(redis_url), use_rq=True)
    woken: list[float] = []

    class Recorded(asyncio.Event):
        def set(self) -> None:
            woken.append(time.monotonic())
            super().set()

    async def scenario() -> float:
        worker.rq_changed = Recorded()
        began = time.monotonic()
        for rid in ("cd1", "cd2", "cd3"):  # three starts in a row: one wake-up for all of them
            worker._show_in_rq(f"{rid}|1", RunSpec.from_fields(rid, "1", {"sid": f"s-{rid}", "g": "default"}))
            await asyncio.sleep(RQ_SETTLE / 10)
        await asyncio.sleep(RQ_SETTLE * 2)
        await worker.store.aclose()
        return began

    began = asyncio.run(scenario())
    assert len(woken) == 1 and woken[0] - began >= RQ_SETTLE * 0.9, (began, woken)


def test_a_show_that_runs_after_the_workers_death_writes_nothing(redis_url: str, r: redis.Redis) -> None:
    """A `show` queued in a thread as the worker stopped can run after `death()` (the stop cancels the
    presence loop, not the thread): it must not register the worker again, nor show its runs."""
    name = "default.after.1.aaaaaa"
    presence = RqPresence(redis_url, group="default", worker_id=name, ttl_seconds=10)
    presence.birth()
    presence.show({"r0|1": {"request_id": "r0", "attempt": "1"}})
    assert rq_worker(redis_url, name) is not None and r.exists(f"rq:job:{rq_job_id('r0', '1')}")
    presence.death()
    presence._next_beat = 0  # a beat due as well: the late call would have registered again
    presence.show({"r1|1": {"request_id": "r1", "attempt": "1"}})
    assert rq_worker(redis_url, name) is None
    assert r.hget(f"rq:worker:{name}", "death") is not None  # rq's record of its death, not a new birth
    assert not r.exists(f"rq:job:{rq_job_id('r1', '1')}")
    assert not r.exists(f"rq:job:{rq_job_id('r0', '1')}") and r.zcard("rq:wip:sluicegate.default") == 0
