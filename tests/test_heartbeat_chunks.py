"""A worker's heartbeat renews its runs' leases in calls of at most HEARTBEAT_CHUNK runs (one script
holding the server for milliseconds would stall every other caller): all of them, with the lost runs
of every chunk reported and the worker's liveness renewed once."""

from __future__ import annotations

import redis

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import HEARTBEAT_CHUNK, run_sync
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness


def test_a_heartbeat_renews_every_lease_of_a_worker_holding_more_runs_than_one_call_takes(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    n = 2 * HEARTBEAT_CHUNK + 10
    h.add_worker("w1", slots=n)
    for i in range(n):
        h.submit(f"beat-{i}")
    held = [f"{run.rid}|{run.attempt}" for run in h.runs]
    assert len(held) == n
    leases = keys.group_key("default", "leases")
    r.zadd(leases, dict.fromkeys(held, 1), xx=True)  # all about to lapse
    gone = [held[0], held[-1]]  # the first chunk's first run and the last chunk's last: no longer the worker's
    h.finish(h.runs[-1])
    h.finish(h.runs[0])
    calls: list[tuple[str, str, int]] = []
    call = h.t._call

    async def counted(name: str, keys_: list[str], args: list[object]) -> object:
        calls.append((name, str(args[2]), len(args) - 3))  # the mode, and how many runs the call renews
        return await call(name, keys_, args)

    h.t._call = counted  # type: ignore[method-assign]
    rejoin, lost = run_sync(h.t.heartbeat("default", "w1", held, lease_ms=h.worker_lease_ms))
    assert not rejoin and lost == gone
    assert calls == [("heartbeat", "live", HEARTBEAT_CHUNK), ("heartbeat", "leaving", HEARTBEAT_CHUNK),
                     ("heartbeat", "leaving", n - 2 * HEARTBEAT_CHUNK)]
    renewed = dict(r.zrange(leases, 0, -1, withscores=True))
    assert len(renewed) == n - 2 and all(score > 1 for score in renewed.values())
