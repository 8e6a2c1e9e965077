"""A worker process: K slots of one group, fed by the scheduler through an inbox list.

Life of a slot: the worker puts one ticket per free slot in its group's idle list; a dispatch
decision takes a ticket and pushes "rid|attempt" into this worker's inbox; the slot runs the
request; `finish` returns the ticket and dispatches the next request into it in the same atomic
step. A control channel lets a preemption or a cancel stop a run at once; heartbeats keep the
worker's liveness key and its runs' leases alive, and tell it which runs it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

from redis.asyncio import Redis

from sessions import keys
from sessions.runs import RunStore
from sluicegate.settings import Settings
from workers.engines import make_engine
from workers.engines.base import Engine
from workers.presence import RqPresence
from workers.runner import Run

log = logging.getLogger(__name__)


def new_worker_id(group: str) -> str:
    return f"{group}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(self, settings: Settings, *, engine: Engine | None = None, worker_id: str | None = None,
                 use_rq: bool = True) -> None:
        assert settings.redis_url, "a worker needs --redis-url"
        self.settings = settings
        self.engine = engine or make_engine(settings)
        self.worker_id = worker_id or new_worker_id(settings.group)
        self.redis = Redis.from_url(settings.redis_url)
        self.store = RunStore(self.redis, worker_id=self.worker_id, group=settings.group,
                              lease_seconds=settings.lease_seconds, session_ttl=settings.session_ttl)
        self.presence = (RqPresence(settings.redis_url, group=settings.group, worker_id=self.worker_id,
                                    ttl_seconds=max(10, int(settings.lease_seconds * 3))) if use_rq else None)
        self.runs: dict[str, asyncio.Task[None]] = {}
        self.stopping = False
        self.shutting_down_runs: set[str] = set()
        self.executing: set[str] = set()  # runs inside the engine loop: the only ones a notice may cancel

    # ---- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if self.presence is not None:
            await asyncio.to_thread(self.presence.birth)
        control = asyncio.create_task(self._control_loop())
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        await self.store.set_free_slots(self.settings.slots)
        log.info("worker %s serving group %r with %d slots", self.worker_id, self.settings.group,
                 self.settings.slots)
        inbox = asyncio.create_task(self._inbox_loop())
        try:
            await stop.wait()
        finally:
            inbox.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inbox
            await self._shutdown()
            for task in (control, heartbeat):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.presence is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.presence.death)
            await self.engine.aclose()
            await self.redis.aclose()

    async def _shutdown(self) -> None:
        """Stop taking work, let runs finish within the grace period, hand the rest back."""
        self.stopping = True
        await self.store.set_free_slots(0)
        for rid, attempt in await self.store.drain_inbox():
            await self.store.hand_back(rid, attempt, reason="worker_shutdown", return_slot=False)
        if self.runs:
            log.info("worker %s: waiting up to %.1f s for %d runs", self.worker_id,
                     self.settings.shutdown_grace_seconds, len(self.runs))
            await asyncio.wait(list(self.runs.values()), timeout=self.settings.shutdown_grace_seconds)
        for key in list(self.runs):
            self.shutting_down_runs.add(key)
            self._interrupt(key)
        if self.runs:
            await asyncio.wait(list(self.runs.values()), timeout=10)

    # ---- loops -------------------------------------------------------------------------------
    async def _inbox_loop(self) -> None:
        while True:
            try:
                assignment = await self.store.next_assignment(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("inbox read failed; retrying")
                await asyncio.sleep(0.5)
                continue
            if assignment is not None:
                rid, attempt = assignment
                key = f"{rid}|{attempt}"
                self.runs[key] = asyncio.create_task(self._serve(rid, attempt, key))

    async def _control_loop(self) -> None:
        """Preemption and cancel notices: stop the named run now rather than at its next token."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(keys.worker_control(self.worker_id))
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    self._interrupt(message["data"].decode())
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                for key in await self.store.heartbeat(list(self.runs)):
                    self._interrupt(key)
                if self.presence is not None:
                    await asyncio.to_thread(self.presence.beat, len(self.runs))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat failed")

    # ---- one run -----------------------------------------------------------------------------
    async def _serve(self, rid: str, attempt: str, key: str) -> None:
        try:
            spec = await self.store.load(rid, attempt)
            if spec is None:  # lost before it started (cancelled, preempted, lease expired)
                await self._release(rid, attempt)
                return
            run = Run(self.store, self.engine, spec)
            so_far = await self.store.output_so_far(spec) if spec.start_index else ""
            self.executing.add(key)
            try:
                outcome = await run.execute(so_far)
            except asyncio.CancelledError:
                self.executing.discard(key)
                if key in self.shutting_down_runs:
                    await self.store.hand_back(rid, attempt, reason="worker_shutdown", return_slot=False)
                else:
                    await self._release(rid, attempt)
                return
            self.executing.discard(key)
            if outcome.kind == "done":
                await self.store.finish(rid, attempt, outcome="done", detail=outcome.detail,
                                        return_slot=not self.stopping)
            elif outcome.kind == "fenced":
                await self._release(rid, attempt)
            elif outcome.transient and int(attempt) < self.settings.backend_retries:
                await self.store.hand_back(rid, attempt, reason=f"backend_error: {outcome.detail}",
                                           return_slot=not self.stopping)
            else:
                await self.store.finish(rid, attempt, outcome="failed", detail=outcome.detail,
                                        return_slot=not self.stopping)
        except Exception as error:  # never silence: the request ends with an error event
            log.exception("run %s failed", key)
            with contextlib.suppress(Exception):
                await self.store.finish(rid, attempt, outcome="failed", detail=f"worker error: {error}",
                                        return_slot=not self.stopping)
        finally:
            self.executing.discard(key)
            self.runs.pop(key, None)
            self.shutting_down_runs.discard(key)

    def _interrupt(self, key: str) -> None:
        task = self.runs.get(key)
        if task is not None and key in self.executing:
            task.cancel()

    async def _release(self, rid: str, attempt: str) -> None:
        """Give the slot back after losing the run (finish on a run we do not own only releases)."""
        await self.store.finish(rid, attempt, outcome="done", detail="released", return_slot=not self.stopping)
