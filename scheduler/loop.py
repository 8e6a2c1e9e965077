"""The scheduler process: the clock-driven half of scheduling.

Submissions and finished runs dispatch at once inside their own atomic scripts; what remains needs
a clock: a group whose quota refills at a known time, requests waiting past their class's max wait,
and runs whose worker stopped renewing its lease. The loop runs `sweep.lua`, then blocks on the hint
list until the earliest quota wake-up or the next sweep, whichever comes first. Any number of
schedulers may run: every step is an idempotent atomic script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis

from scheduler.policy import publish_policy
from sessions import keys
from sessions.scripts import Scripts
from sluicegate.settings import Settings

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url, "the scheduler needs --redis-url"
        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url)
        self.scripts = Scripts(self.redis)
        self.lease_ms = int(settings.lease_seconds * 1000)

    async def sweep_once(self) -> float:
        """One sweep; returns how long to wait before the next one (seconds)."""
        requeued, promoted, started, next_wake, now = await self.scripts.sweep(
            keys=[keys.LEASES, keys.WAKE, keys.GROUPS], args=[self.lease_ms])
        if requeued or promoted:
            log.info("sweep: %d runs requeued from lost workers, %d requests aged, %d dispatched",
                     requeued, promoted, started)
        wait = self.settings.sweep_seconds
        next_wake, now = float(next_wake), float(now)
        if next_wake >= 0:
            wait = min(wait, max(0.0, (next_wake - now) / 1000))
        return wait

    async def run(self, stop: asyncio.Event) -> None:
        await publish_policy(self.redis, self.settings)
        log.info("scheduler up (sweep every %.2f s)", self.settings.sweep_seconds)
        try:
            while not stop.is_set():
                try:
                    wait = await self.sweep_once()
                    if wait > 0.0005:
                        await self.redis.blpop([keys.HINT], timeout=wait)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("sweep failed; retrying")
                    await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
