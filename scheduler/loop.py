"""The scheduler process: the clock-driven half of scheduling.

Submissions and finished runs dispatch at once inside their own atomic functions; what remains needs a
clock: a group whose quota refills at a known time, requests waiting past their class's max wait,
and runs whose worker stopped renewing its lease. Each group has a loop of its own (a decision reads
only its group's state, in its group's slot of a cluster): it runs the group's sweep, then sleeps until
the earliest quota or deadline wake-up or the next sweep, whichever comes first, or until a hint on the
group's hint list (a call that needs a sweep sooner). A group
added while the scheduler runs gets its loop at once (sg:groups:hint), else on the next read; a group whose
slot cannot be reached holds back no other group's loop. On a
cluster a repair pass also readies the heads that a caller who died half-way left in an outbox
(sessions/transitions.py), and the scheduler that swept writes the new effective class of each request its
sweep promoted, or whose deadline boost a hand-back dropped, on the data plane (effective_priority; one
server's sweep writes it itself). Any number of schedulers may run: every step is an idempotent atomic call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from sluicegate.scheduler.policy import publish_policy
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client, store_unavailable, text
from sluicegate.sessions.registry import copy_policy
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import Transitions
from sluicegate.settings import Settings

log = logging.getLogger(__name__)
GROUPS_REFRESH_SECONDS = 1.0
REPAIR_SECONDS = 2.0
HINT_POP_SECONDS = 5.0  # a hint watcher's blocking pop, renewed: the stop is seen within this
CLASSES_POPPED = 100  # effective classes taken from a group's epw at a time
# KEYS[1] a request's hash   ARGV[1] its effective class. Only while the hash exists: an ended request's
# hash expires, and must not come back as a stray key holding nothing but `ep`.
SET_CLASS = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'ep', ARGV[1]) end"


async def write_effective_classes(client: Any, group: str) -> int:
    """Cluster: write the effective class of each request the group's sweeps promoted, or whose boost a
    hand-back dropped (sweep.lua and runs.lua release push "rid|class" to the group's epw), on its data
    plane, where GET /v1/requests/{rid} reads it. Each entry is popped by one scheduler; one that dies after
    the pop, or a data master that refuses the write, leaves that request showing its older class (a display
    only: the control plane ranks it by its own copy). Returns the number of entries written."""
    written = 0
    while True:
        entries = await client.lpop(keys.group_key(group, "epw"), CLASSES_POPPED) or []
        for entry in map(text, entries):
            rid, _, cls = entry.rpartition("|")
            try:
                await client.eval(SET_CLASS, 1, keys.request(rid), cls)
                written += 1
            except Exception as error:
                if not store_unavailable(error):
                    raise
                log.warning("writing the effective class of %s failed (%s); it shows its older one", rid, error)
        if len(entries) < CLASSES_POPPED:
            return written


class Scheduler:
    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url, "the scheduler needs --redis-url"
        self.settings = settings
        self.cluster = settings.redis_cluster
        self.redis = async_client(settings.redis_url, cluster=self.cluster, socket_timeout=30)
        self.scripts = Scripts(self.redis, single_server=not self.cluster)
        self.transitions = Transitions(self.scripts, lease_ms=int(settings.lease_seconds * 1000),
                                       session_ttl=settings.session_ttl, max_attempts=settings.max_attempts)
        self.lease_ms = int(settings.lease_seconds * 1000)

    async def sweep_once(self, group: str) -> float:
        """One sweep of a group; returns how long to wait before the next one (seconds). The wake-up is the
        sweep's, on the server's clock at the call: the call's own time is taken off, or every wake of a
        throttled group would come that late, and with a burst of 1 a requests/s quota would lose it each time."""
        called = time.monotonic()
        result = await self.transitions.sweep(group)
        if self.cluster:  # also when nothing was promoted: a boost dropped at a hand-back (runs.lua release)
            await write_effective_classes(self.redis, group)  # notes its end too; an empty epw costs one pop
        if result.lapsed or result.promoted:
            log.info("sweep %s: %d runs of lost workers handed back, %d requests aged, %d dispatched",
                     group, result.lapsed, result.promoted, result.started)
        wait = self.settings.sweep_seconds
        if result.next_wake_ms >= 0:
            wait = min(wait, max(0.0, (result.next_wake_ms - result.now_ms) / 1000 - (time.monotonic() - called)))
        return wait

    async def _group_loop(self, group: str, stop: asyncio.Event) -> None:
        """Sweep, then sleep until the sweep's wake-up (timed here) or a hint (a call that needs a sweep sooner).
        The wake-up is not BLPOP's timeout: the server checks blocked clients' timeouts at its `hz` (10 a second
        by default), so an idle server ended a 50 ms wait after 100 ms and a requests/s quota of 20 admitted
        about 14 a second. A watcher holds the blocking pop, with a long timeout, and sets `hinted`.
        The group's policy is copied first (_copy_policy), here rather than where its loop is created: a group
        whose slot cannot be reached must hold back no other group's loop."""
        if not await self._copy_policy(group, stop):
            return
        hinted = asyncio.Event()
        watcher = asyncio.create_task(self._watch_hints(group, hinted, stop))
        try:
            while not stop.is_set():
                try:
                    hinted.clear()  # a hint from here on (this sweep's own included) ends the wait below
                    wait = await self.sweep_once(group)
                    if wait > 0.0005:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(hinted.wait(), wait)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("sweep of group %s failed; retrying", group)
                    await asyncio.sleep(0.5)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    async def _copy_policy(self, group: str, stop: asyncio.Event) -> bool:
        """Copy the policy into the group's control plane, retrying until it is done (True) or the stop (False)."""
        while not stop.is_set():
            try:
                await copy_policy(self.redis, group)
                return True
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("copying the policy into group %s failed; retrying", group)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), GROUPS_REFRESH_SECONDS)
        return False

    async def _watch_hints(self, group: str, hinted: asyncio.Event, stop: asyncio.Event) -> None:
        """Pop the group's hints as they come (its own connection: a blocking pop holds it) and say so."""
        hints = async_client(self.settings.redis_url, cluster=self.cluster, socket_timeout=30)  # blocking pops
        try:
            while not stop.is_set():
                try:
                    if await hints.blpop([keys.group_key(group, "hint")], timeout=HINT_POP_SECONDS):
                        hinted.set()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("waiting for group %s's hints failed; retrying", group)
                    hinted.set()  # a hint may have been lost with the connection: the loop sweeps
                    await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                await hints.aclose()

    async def _repair_loop(self, stop: asyncio.Event) -> None:
        buckets = keys.all_buckets()
        while not stop.is_set():
            try:
                repaired = await self.transitions.repair(buckets, age_ms=int(REPAIR_SECONDS * 1000))
                if repaired:
                    log.warning("repair: %d half-done transitions completed", repaired)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("repair pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPAIR_SECONDS)

    @staticmethod
    async def _until_groups_change(hints: Any, stop: asyncio.Event) -> None:
        """Until a group is added (register_group's hint), GROUPS_REFRESH_SECONDS pass, or the stop.
        A group found only on the refresh had no loop for up to a second: a high-priority request that
        came inside a running request's preemption quantum waited for it instead of the quantum."""
        hint = asyncio.ensure_future(hints.blpop([keys.GROUPS_HINT], timeout=GROUPS_REFRESH_SECONDS))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({hint, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if hint.done():
                hint.result()  # its error, if any
        finally:
            for task in (hint, stopped):
                task.cancel()
            await asyncio.gather(hint, stopped, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        await publish_policy(self.redis, self.settings)
        log.info("scheduler up (sweep every %.2f s%s)", self.settings.sweep_seconds,
                 f", cluster: repair pass every {REPAIR_SECONDS:.0f} s" if self.cluster else "")
        loops: dict[str, asyncio.Task[None]] = {}
        if self.cluster:
            loops[""] = asyncio.create_task(self._repair_loop(stop))
        hints = async_client(self.settings.redis_url, cluster=self.cluster, socket_timeout=30)  # blocking pops
        try:
            while not stop.is_set():
                try:
                    for group in sorted(text(g) for g in await self.redis.smembers(keys.GROUPS)):
                        if group not in loops:  # it copies the policy into its group first
                            loops[group] = asyncio.create_task(self._group_loop(group, stop))
                    await self._until_groups_change(hints, stop)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reading the groups failed; retrying")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), GROUPS_REFRESH_SECONDS)
        finally:
            for task in loops.values():
                task.cancel()
            for task in loops.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for client in (hints, self.redis):
                with contextlib.suppress(Exception):
                    await client.aclose()
