"""A receiver that never answers: its backlog of waiting callbacks costs the store about one touch a callback
per turn it can get (at least about once a timeout), not one every pass. Real Valkey, a real black-holed
socket on 127.0.0.1 (accepts, never answers)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import redis

from sluicegate.embedded import EmbeddedCluster, EmbeddedServer
from sluicegate.sessions import keys
from sluicegate.settings import Settings
from sluicegate.webhooks import delivery as delivery_module
from sluicegate.webhooks.delivery import Delivery
from tests.test_webhooks import BlackHole, hook_settings


def command_calls(server: EmbeddedServer | EmbeddedCluster, *, reset: bool = False) -> Counter[str]:
    """INFO commandstats calls by command, summed over every master (a script's own calls included)."""
    if isinstance(server, EmbeddedCluster):
        clients = [server.client(index) for index in range(server.masters)]
    else:
        clients = [redis.Redis.from_url(server.url, decode_responses=True)]
    calls: Counter[str] = Counter()
    for client in clients:
        with client:
            if reset:
                client.config_resetstat()
            for name, stats in client.info("commandstats").items():
                calls[name.removeprefix("cmdstat_")] += int(stats["calls"])
    return calls


def ended_with_callback(r, rid: str, url: str, *, ended_ms: int, due_ms: int, ttl_s: int = 60) -> None:
    """A request that ended at `ended_ms` with its callback queued, due at `due_ms`, as the terminal step
    leaves it."""
    r.hset(keys.request(rid), mapping={"st": "done", "sid": f"s-{rid}", "tn": "t", "g": "default", "cb": url,
                                       "n": 1, "fin": ended_ms})
    r.expire(keys.request(rid), ttl_s)
    r.zadd(keys.callbacks_due(keys.bucket_of_request(rid)), {rid: due_ms})


def run_delivery(settings: Settings, *, poll_seconds: float, seconds: float, hole: BlackHole,
                 until: Callable[[], bool] | None = None) -> None:
    """One delivery process for `seconds` (or until `until`), then stopped: the black hole is closed first,
    so that the attempts it holds end at once instead of at their timeout."""

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(Delivery(settings, poll_seconds=poll_seconds).run(stop))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until and until()):
            await asyncio.sleep(0.1)
        hole.stop()
        stop.set()
        await task

    asyncio.run(main())


def test_a_black_holed_hosts_backlog_is_touched_about_once_a_turn_not_every_pass(
        valkey_server: EmbeddedServer | EmbeddedCluster, redis_url: str, r) -> None:
    """1,000 callbacks due to a receiver that accepts and never answers, a pass every 0.2 s for 6 s (30
    passes; the host turns slow after 1 s, its attempts are cut at 2 s). Each waiting callback is read and
    pushed back about once per turn it can get (PER_HOST places, each freeing every 2 s: its turn is minutes
    away), but no further than about a timeout (2 s: a receiver that recovers gets its backlog within that),
    so each is read about once a timeout: its first read and about one each 2 s of the 6, and the held ones
    each pass of the first second. The commands the passes send for the backlog stay a few touches a
    callback: at most 5 EVALs and 40 commands in all a callback (the sweep's ZCOUNTs aside: 1,024 a pass,
    whatever the backlog); about 3,900-4,500 EVALs and 36,000-37,000 commands here. Pushed by turns not
    capped (10ee7d3), about 2,400 EVALs and 21,000 commands (bounds 4 and 32 a callback). Before that, each
    was pushed a flat max(poll, timeout / 4) = 0.5 s (50 ms while the host still turned over) and so read and
    pushed again every pass or two: about 14,000 EVALs, 100,000 commands."""
    n = 1_000
    hole = BlackHole()
    now = int(time.time() * 1000)
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        ended_with_callback(pipe, f"{keys.all_buckets()[i % 1024]}bh{i}", f"{hole.url}/hook", ended_ms=now,
                            due_ms=now)
    pipe.execute()
    settings = hook_settings(redis_url, webhook_timeout=2.0, session_ttl=60)  # a 124-s schedule: none fails
    command_calls(valkey_server, reset=True)
    run_delivery(settings, poll_seconds=0.2, seconds=6.0, hole=hole)
    calls = command_calls(valkey_server)
    per_callback = sum(c for name, c in calls.items() if name not in ("zcount", "info", "config|resetstat"))
    assert hole.most_open == delivery_module.PER_HOST  # only its own places, as before
    assert calls["eval"] <= 5 * n, calls  # about 3,900-4,500 here (one read a timeout); 13,960 before 10ee7d3
    assert per_callback <= 40 * n, calls  # about 36,000-37,000 here; 100,192 before 10ee7d3
    assert r.zcard(keys.callbacks_due(keys.all_buckets()[5])) == 1  # none dropped: all still queued
