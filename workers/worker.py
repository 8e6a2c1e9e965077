"""A worker process: K slots of one group, fed by the scheduler through an inbox list.

Life of a slot: the worker puts one ticket per free slot in its group's idle list; a dispatch
decision takes a ticket and pushes "rid|attempt" and the run spec into this worker's inbox; the slot runs the
request; `finish` returns the ticket and dispatches the next request into it in the same atomic
step. A control channel lets a preemption or a cancel stop a run at once; heartbeats keep the
worker's liveness key and its runs' leases alive, tell it which runs it lost, and reap the tickets
of workers that died without saying goodbye.

The ticket ledger must stay exact (tickets in the idle list + assignments in the inbox + runs held
== slots): every run ends in exactly one finish or hand-back (retried through dropped connections;
the scripts make a repeat a no-op), and when the worker had lapsed (paused past its lease, Redis
restarted) it re-offers exactly its free slots, between two inbox reads and with no run ending in
flight, so that nothing it counts can change under it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from sluicegate.sessions import keys
from sluicegate.sessions.connect import store_unavailable
from sluicegate.sessions.runs import Assignment, RunSpec, RunStore
from sluicegate.sessions.subscriber import Subscriber
from sluicegate.sessions.transitions import EndProgress, Tail
from sluicegate.settings import Settings
from sluicegate.workers.engines import make_engine
from sluicegate.workers.engines.base import Engine
from sluicegate.workers.presence import RqPresence
from sluicegate.workers.redis_retry import through_dropped_connections
from sluicegate.workers.runner import Run, cannot_continue

log = logging.getLogger(__name__)
T = TypeVar("T")

PROBE_BUDGET = 30.0  # seconds a worker spends learning its engine before it offers its slots anyway
PROBE_RETRY_SECONDS = 10.0  # between probes of a backend that has not answered one (still loading its model)
MODEL_RETRY_SECONDS = 10.0  # between looks at the backend's model list while it has not answered one
MODEL_LOOKUP_SECONDS = 5.0  # one look's bound
RQ_SETTLE = 0.05  # seconds a change of the runs shown waits before rq is told (see _presence_loop)
EARLY_NOTICES = 1024  # notices kept for runs whose assignment has not arrived (most are for ended runs)
# The hand-back reason of a run whose backend was not reached: not one of the failures that count against a
# request's --max-attempts (sessions/lua/includes/requests.lua FAILURES).
BACKEND_DOWN = "backend_unavailable"
# Such hand-backs are free up to a request's start number FREE_BACKEND_DOWN_STARTS x --max-attempts; past it
# they count as failures: a backend whose probe passes while its chat calls do not (or --no-backend-probe)
# would else hand the same request back every PROBE_RETRY_SECONDS for ever.
FREE_BACKEND_DOWN_STARTS = 4
RQ_LEAVE_SECONDS = 2.0  # a shutdown waits this long at most for rq to forget the worker (else its records expire)


def new_worker_id(group: str) -> str:
    """The group and a random part: the id appears in `started` and `resumed` events, which tenants read,
    so it names no host and no process (operators find those in /v1/admin/stats: `host`, `pid`)."""
    return f"{group}.{uuid.uuid4().hex[:12]}"


def in_daemon_thread(call: Callable[[], T]) -> asyncio.Future[T]:
    """`call()` in a daemon thread of its own, for the rq presence's blocking calls: unlike asyncio.to_thread's
    (the default executor's, waited for when the loop closes), a call stuck on an rq server that does not answer
    keeps no worker process from exiting after its shutdown."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()
    done.set_running_or_notify_cancel()  # an awaiter's cancel or timeout cannot cancel it: the thread sets it

    def target() -> None:
        try:
            done.set_result(call())
        except Exception as error:  # handed to the awaiter
            done.set_exception(error)

    threading.Thread(target=target, name="sluicegate-rq", daemon=True).start()
    return asyncio.wrap_future(done)


class Worker:
    def __init__(self, settings: Settings, *, engine: Engine | None = None, worker_id: str | None = None,
                 use_rq: bool = True) -> None:
        assert settings.redis_url, "a worker needs --redis-url"
        self.settings = settings
        self.engine = engine or make_engine(settings)
        self.worker_id = worker_id or new_worker_id(settings.group)
        # Named connections: `CLIENT LIST` shows which worker holds which connection.
        cluster = settings.redis_cluster
        self.store = RunStore.connect(settings.redis_url, client_name=f"sluicegate-worker:{self.worker_id}",
                                      worker_id=self.worker_id, group=settings.group,
                                      lease_seconds=settings.lease_seconds, session_ttl=settings.session_ttl,
                                      cluster=cluster, model=settings.backend_models().get(
                                          settings.group, settings.backend_models().get("*")),
                                      max_attempts=settings.max_attempts)
        self.redis = self.store.redis
        # rq has no cluster support (rq#1942): on a cluster the rq presence goes to a standalone
        # --rq-redis-url when one is given, and is off otherwise.
        rq_url = settings.rq_redis_url or (None if cluster else settings.redis_url)
        self.presence = (RqPresence(rq_url, group=settings.group, worker_id=self.worker_id,
                                    ttl_seconds=max(10, int(settings.lease_seconds * 3)))
                         if use_rq and rq_url else None)
        self.rq_runs: dict[str, dict[str, Any]] = {}  # runs executing, as rq's tooling is to show them
        self.rq_since: dict[str, float] = {}  # when each of them started executing (time.monotonic())
        self.rq_changed = asyncio.Event()  # rq_runs changed RQ_SETTLE s ago: the presence loop shows it
        self.rq_due: asyncio.TimerHandle | None = None  # sets rq_changed RQ_SETTLE s after a change
        self.runs: dict[str, asyncio.Task[None]] = {}  # "rid|attempt" -> its task; each holds one ticket
        self.executing: set[str] = set()  # runs inside the engine loop: the only ones a notice may cancel
        self.interrupted: set[str] = set()  # notices for runs not yet (or no longer) executing
        self.early_notices: dict[str, str] = {}  # reasons of notices for runs not received yet, oldest first
        self.handing_back: set[str] = set()  # shutdown: interrupted runs go back to the queue (or fail: _serve)
        self.stop_reasons: dict[str, str] = {}  # why a notice stopped a run it holds (its hand-back says so)
        self.notice_awaited: dict[str, asyncio.Event] = {}  # fenced runs whose notice is awaited (_fence_reason)
        self.stopping = False
        self.resync_needed = False
        self._ending = 0  # run ends (finish / hand-back scripts) in flight
        self._ends_quiet = asyncio.Event()
        self._resyncing: asyncio.Event | None = None
        self.slots = settings.slots_or_default  # until the engine says how many it runs at once
        self.probe_due = False  # the probe has not reached the backend yet: the heartbeats probe again
        self.probed_at = 0.0  # when the backend was last probed (_probe)
        self.probing: asyncio.Task[None] | None = None
        # A run could not reach the backend (BackendDown): no slot is offered until the probe answers.
        self.backend_down = False
        self.surplus = 0  # runs holding a ticket past the slots (they shrank): their ends give none back
        self.model_looked_at = 0.0  # when the backend's model list was last asked (_learn_model)
        self.model_lookup: asyncio.Task[None] | None = None

    async def _learn_engine(self) -> None:
        """Ask the engine what it can do (workers/engines/probe.py): its slot count becomes this worker's
        unless --slots says otherwise, and operators see it all in /v1/admin/stats. Bounded: an engine
        that does not answer leaves the defaults until it does (_look_for_probe)."""
        self.store.shown = {"engine": self.settings.engine, "host": socket.gethostname(), "pid": os.getpid()}
        if await self._probe():  # else it failed on the same backend: the heartbeats look again (_look_for_model)
            await self._learn_model(register=False)
        self._show_resume()

    async def _probe(self) -> bool:
        """Probe the engine, if it can be and --backend-probe; False when the probe did not reach it (not up
        yet: probe_due, the heartbeats probe again)."""
        probe = getattr(self.engine, "probe", None)
        if probe is None or not self.settings.backend_probe:
            self.probe_due = False  # nothing to ask: a withdrawal (_withdraw) ends at its first look
            return True
        self.probed_at = time.monotonic()
        try:
            async with asyncio.timeout(PROBE_BUDGET):
                found = await probe(self.settings.group)
        except Exception as error:  # an engine that is not up yet: the defaults, and say so
            log.warning("worker %s: probing the backend failed (%s); using the defaults until it answers (probed "
                        "again every %g s)", self.worker_id, error, PROBE_RETRY_SECONDS)
            self.probe_due = True
            return False
        self.probe_due = False
        if self.settings.slots is None and found.slots:
            self.slots = found.slots
        self.store.shown["capabilities"] = found.as_dict()
        log.info("worker %s: backend is %s", self.worker_id, found)
        return True

    def _show_resume(self) -> None:
        """How the engine resumes a run (--backend-continue over what the probe found), shown and told."""
        resume_by = getattr(self.engine, "resume_by", None)
        if resume_by is not None and self.settings.backend_continue != "auto":
            resume_by(self.settings.backend_continue == "yes")
        resume = getattr(self.engine, "resume_mode", None)
        if resume is not None:
            self.store.shown["resume"] = resume
            self.store.resume_mode = resume

    def _look_for_probe(self) -> None:
        """From a heartbeat: probe a backend that was not up again when it is due, beside the heartbeats."""
        if not self.probe_due or self.probing is not None and not self.probing.done():
            return
        if time.monotonic() - self.probed_at >= PROBE_RETRY_SECONDS:
            self.probing = asyncio.create_task(self._probe_again())

    async def _probe_again(self) -> None:
        """A backend up after its worker: what it can do and its slot count replace the defaults, and are
        offered with the slots again (the inbox loop's resync: exact, between two inbox reads)."""
        if self.stopping or not await self._probe():
            return
        if self.backend_down:
            log.warning("worker %s: the backend answered the probe again; offering its slots again", self.worker_id)
            self.backend_down = False
            self.store.shown.pop("backend", None)
        self._show_resume()
        await self._learn_model(register=True)
        log.info("worker %s: the backend answered the probe: %d slots, resumes by %s", self.worker_id, self.slots,
                 self.store.resume_mode or "?")
        self.resync_needed = True

    async def _withdraw(self) -> None:
        """A run could not reach the backend before its first token (restarted, loading its model:
        BackendDown). Failing fast, this worker would look free and take the group's work only to hand it
        back: it offers no slot (the inbox loop's resync, woken now) until its probe answers again, from the
        heartbeats every PROBE_RETRY_SECONDS (_look_for_probe, as for a backend not up at start). Its runs
        go on; their ends give no ticket back meanwhile (_end). With every worker's backend down, the
        group's requests wait queued."""
        if not self.backend_down:
            log.warning("worker %s: its backend is not reachable; withdrawing its slots until the probe answers "
                        "(probed every %g s)", self.worker_id, PROBE_RETRY_SECONDS)
            self.probed_at = time.monotonic()  # the run just tried it: the next look is due a retry period on
        self.backend_down = self.probe_due = True
        self.store.shown["backend"] = "down"
        self.resync_needed = True
        with contextlib.suppress(Exception):  # else the inbox loop resyncs after its read's timeout (1 s)
            await self.store.wake_inbox()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        # First, and raced with the stop: nothing is offered yet, so a stop meanwhile (the probe takes up to
        # PROBE_BUDGET s) leaves at once, with no slot offered and no run taken only to be handed back.
        if not await self._learned_unless_stopped(stop):
            log.info("worker %s: stopped while learning its engine; leaving before offering its slots",
                     self.worker_id)
            await self._close()
            return
        # rq registers the worker at the presence loop's first beat, beside the work: rq is the operators' view,
        # and an rq server down or not answering must keep no worker from serving (its next beat retries).
        # Sharded pub/sub (on a cluster: on the master of the channel's slot), confirmed by the server
        # before any run can be dispatched here.
        subscriber = Subscriber(self.settings.redis_url, self._on_control, cluster=self.settings.redis_cluster,
                                client_name=f"sluicegate-worker:{self.worker_id}")
        subscriber.subscribe(keys.worker_control(self.settings.group, self.worker_id))
        await subscriber.start()
        control = asyncio.create_task(self._control_loop(subscriber))
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        presence = asyncio.create_task(self._presence_loop())
        try:
            await self.store.set_free_slots(self.slots, self.slots)
        except Exception as error:
            if not store_unavailable(error):
                raise
            log.warning("worker %s: could not offer its slots yet (%s); retrying", self.worker_id, error)
            self.resync_needed = True
        log.info("worker %s serving group %r with %d slots", self.worker_id, self.settings.group, self.slots)
        inbox = asyncio.create_task(self._inbox_loop())
        try:
            await stop.wait()
        finally:
            await self._shutdown(inbox)
            for task in (control, heartbeat, presence, self.model_lookup, self.probing):
                if task is None:
                    continue
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.rq_due is not None:
                self.rq_due.cancel()
                self.rq_due = None
            with contextlib.suppress(Exception):
                await self.store.set_free_slots(0)  # gone for good: no liveness key, no ticket
            await self._close()

    async def _learned_unless_stopped(self, stop: asyncio.Event) -> bool:
        """`_learn_engine`, unless `stop` is set first (then it is cancelled): whether it was learnt."""
        learning = asyncio.create_task(self._learn_engine())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({learning, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (learning, stopped):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await learning  # its probe or model lookup stops here, not beside the shutdown
        return not stop.is_set()

    async def _close(self) -> None:
        """Let go of rq, the engine and the store: the end of a run(), whenever it stops."""
        if self.presence is not None:
            await self._leave_rq(self.presence)
        await self.engine.aclose()
        await self.store.aclose()

    async def _leave_rq(self, presence: RqPresence) -> None:
        """rq forgets the worker, waited for RQ_LEAVE_SECONDS at most: an rq server that does not answer (host
        gone) held the shutdown ~11 s (redis-py's timeouts and retries), and rq is only the operators' view:
        what is left there expires on its own (its TTL)."""
        try:
            await asyncio.wait_for(in_daemon_thread(presence.death), RQ_LEAVE_SECONDS)
        except TimeoutError:
            log.warning("worker %s: rq did not answer within %g s at its shutdown; its rq records expire on their "
                        "own", self.worker_id, RQ_LEAVE_SECONDS)
        except Exception as error:
            log.warning("worker %s: leaving rq failed (%s); its rq records expire on their own", self.worker_id,
                        error)

    async def _shutdown(self, inbox: asyncio.Task[None]) -> None:
        """Stop taking work, let runs finish within the grace period, hand the rest back: all but those that
        streamed what no engine can continue (a tool call, structured output), which end failed (_serve)."""
        self.stopping = True
        with contextlib.suppress(Exception):
            await self.store.wake_inbox()
        try:  # the inbox loop exits first, so that no resync of its can offer slots again after this
            await asyncio.wait_for(inbox, timeout=5)  # it hands back what arrives meanwhile
        except (asyncio.CancelledError, Exception):  # includes the timeout
            inbox.cancel()
        with contextlib.suppress(Exception):
            await self.store.set_free_slots(0)  # no ticket left: nothing new is dispatched here
        with contextlib.suppress(Exception):  # what was dispatched here before that goes back
            for drained in await self.store.drain_inbox():
                if drained.request_id:
                    await self._end(drained.request_id, drained.attempt, reason="worker_shutdown")
        if self.runs:
            log.info("worker %s: waiting up to %.1f s for %d runs", self.worker_id,
                     self.settings.shutdown_grace_seconds, len(self.runs))
            await asyncio.wait(list(self.runs.values()), timeout=self.settings.shutdown_grace_seconds)
        for key in list(self.runs):
            self.handing_back.add(key)
            self._interrupt(key)
        if self.runs:
            await asyncio.wait(list(self.runs.values()), timeout=10)

    # ---- loops -------------------------------------------------------------------------------
    async def _inbox_loop(self) -> None:
        """The one place where assignments become runs (so a resync here sees an exact count)."""
        while not self.stopping:
            if self.resync_needed:
                try:
                    await self._resync()
                except Exception as error:
                    log.warning("worker %s: offering its free slots failed (%s); retrying", self.worker_id, error)
                    await asyncio.sleep(0.5)
                    continue
            try:
                assignments = await self.store.next_assignments(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The connection broke: an assignment popped on the way may be lost with its
                # reply (its lease lapses and it resumes elsewhere), so recount the free slots.
                log.warning("worker %s: inbox read failed (%s); retrying", self.worker_id, error)
                self.resync_needed = True
                await asyncio.sleep(0.5)
                continue
            for i, assignment in enumerate(assignments):  # all become runs before the next resync counts them
                if self.stopping:  # what is left of the batch goes back at once, together
                    await asyncio.gather(*(self._end(a.request_id, a.attempt, reason="worker_shutdown")
                                           for a in assignments[i:] if a.request_id))
                    break
                await self._take(assignment)
            if assignments:  # their engine calls go out before the next inbox read, which a lean client
                await asyncio.sleep(0)  # writes at once (sessions/resp.py): a run's producer starts a turn later

    async def _take(self, assignment: Assignment) -> None:
        """An assignment from the inbox becomes a run."""
        if not assignment.request_id:  # the shutdown wake-up
            return
        key = assignment.key
        early = self.early_notices.pop(key, None)
        if early is not None:
            self.interrupted.add(key)
            self.stop_reasons[key] = early or "released"
        self.runs[key] = asyncio.create_task(self._serve(assignment))
        await asyncio.sleep(0)  # the run starts (its producer calls the engine a turn later) before the next

    async def _control_loop(self, subscriber: Subscriber) -> None:
        """Preemption and cancel notices: stop the named run now rather than at its next token. They
        arrive through `_on_control`; the subscriber reconnects and resubscribes by itself (the
        heartbeats cover a gap). This task holds it until the worker stops."""
        try:
            await asyncio.Event().wait()
        finally:
            await subscriber.stop()

    def _on_control(self, kind: bytes, channel: bytes, payload: bytes | None) -> None:
        if kind == b"smessage" and payload is not None:
            self._notice(payload.decode())

    def _model_wanted(self) -> bool:
        """No --backend-model, and the backend has not said its own yet (an openai engine)."""
        return self.store.model is None and getattr(self.engine, "model_for", None) is not None

    async def _learn_model(self, *, register: bool) -> None:
        """The backend's own model (the first of its /v1/models) becomes the group's, so that /v1/models
        lists it and chat calls naming it are routed to the group; `register`: declare it now (at start,
        the slots' first offer does). A backend that does not answer (still loading its model) is looked
        at again from the heartbeats, every MODEL_RETRY_SECONDS."""
        if not self._model_wanted():
            return
        self.model_looked_at = time.monotonic()
        try:
            async with asyncio.timeout(MODEL_LOOKUP_SECONDS):
                model = await self.engine.model_for(self.settings.group)  # type: ignore[attr-defined]
        except Exception as error:
            log.warning("worker %s: the backend's model list failed (%s); the group serves no model name until "
                        "it answers (looked at again every %g s; or set --backend-model)", self.worker_id, error,
                        MODEL_RETRY_SECONDS)
            return
        self.store.model = model  # sent to the backend, and declared with every offer of the slots
        if not register:
            return
        try:
            named = await self.store.declare_model()
        except Exception as error:  # the store: the next offer of the slots declares it
            log.warning("worker %s: declaring model %r failed (%s)", self.worker_id, model, error)
            return
        if named == model:
            log.info("worker %s: group %s serves the backend's model %s", self.worker_id, self.settings.group, model)

    def _look_for_model(self) -> None:
        """From a heartbeat: look at the backend's model list again when it is due, beside the heartbeats."""
        if not self._model_wanted() or self.model_lookup is not None and not self.model_lookup.done():
            return
        if time.monotonic() - self.model_looked_at >= MODEL_RETRY_SECONDS:
            self.model_lookup = asyncio.create_task(self._learn_model(register=True))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            self._look_for_model()
            self._look_for_probe()
            try:
                rejoin, lost = await self.store.heartbeat(list(self.runs), leaving=self.stopping)
                for entry in lost:  # "rid|attempt", or with the reason the control plane stopped it
                    self._notice(entry)
                if rejoin and not self.stopping:
                    log.warning("worker %s had lapsed (paused, or Redis lost its state): re-offering its "
                                "free slots", self.worker_id)
                    self.resync_needed = True
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("worker %s: heartbeat failed: %s", self.worker_id, error)

    async def _presence_loop(self) -> None:
        """rq's registry heartbeat and the runs rq shows, apart from the lease heartbeats: rq is the
        operators' view and must never delay the heartbeats that keep the runs' leases, nor a run.
        rq is shown only the runs that started RQ_SETTLE s ago or more, and a change is written RQ_SETTLE
        s after it, with every change made meanwhile (at most one write per RQ_SETTLE s). Written at
        once, as it was, a run's start went to rq while the run waited for its first token: a redis-py
        call in a thread beside the event loop, and a script in Valkey ahead of the first token's append.
        A run shorter than RQ_SETTLE is never shown, and costs rq nothing. The wait is a timer
        (`_rq_soon`), not this loop: woken at the change to sleep here, it took two task steps on the run's
        way from its inbox to its engine call."""
        if self.presence is None:
            return
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rq_changed.wait(), timeout=self.presence.next_beat_in())
            self.rq_changed.clear()
            settled = self._settled_runs(time.monotonic())
            if len(settled) < len(self.rq_runs):  # the younger ones are shown at the next write
                self._rq_soon()
            if not self.presence.would_write(settled):
                continue
            try:
                await in_daemon_thread(functools.partial(self.presence.show, settled))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("worker %s: rq heartbeat failed: %s", self.worker_id, error)
                await asyncio.sleep(self.presence.beat_seconds)  # its beat stays due: not again at once

    def _settled_runs(self, now: float) -> dict[str, dict[str, Any]]:
        """The runs executing that started RQ_SETTLE s before `now` or earlier: what rq is to show."""
        return {key: run for key, run in self.rq_runs.items() if now - self.rq_since[key] >= RQ_SETTLE}

    def _show_in_rq(self, key: str, spec: RunSpec | None) -> None:
        """A run starts executing (its spec) or ends (None): the presence loop tells rq, off the run's path."""
        if self.presence is None:
            return
        if spec is None:
            self.rq_since.pop(key, None)
            if self.rq_runs.pop(key, None) is None:
                return
        else:
            self.rq_since[key] = time.monotonic()
            self.rq_runs[key] = {"request_id": spec.request_id, "attempt": spec.attempt,
                                 "session_id": spec.session_id, "tenant": spec.tenant, "priority": spec.priority}
        self._rq_soon()

    def _rq_soon(self) -> None:
        """The presence loop shows rq_runs RQ_SETTLE s from now, with every change made meanwhile."""
        if self.rq_due is None:
            self.rq_due = asyncio.get_running_loop().call_later(RQ_SETTLE, self._rq_fall_due)

    def _rq_fall_due(self) -> None:
        self.rq_due = None
        self.rq_changed.set()

    # ---- the ticket ledger -------------------------------------------------------------------
    async def _resync(self) -> None:
        """Offer exactly the free slots again: slots minus the runs held (each still owes a ticket)."""
        gate = asyncio.Event()
        self._resyncing = gate  # run ends wait: none may return a ticket while we count
        try:
            while self._ending:
                self._ends_quiet.clear()
                await self._ends_quiet.wait()
            held = len(self.runs)  # may exceed the slots for a moment: a run whose slot was handed over
            self.resync_needed = False  # before the call: a need found meanwhile (a probe's new count) stands
            # Backend down (_withdraw): none offered, and the tickets its runs hold are surplus (given back by none)
            usable = 0 if self.backend_down else self.slots
            try:
                offer = await self.store.set_free_slots(usable - held, self.slots, held=list(self.runs))
            except BaseException:
                self.resync_needed = True
                raise
            # What holds a ticket past the slots (they shrank under held runs and waiting assignments),
            # counted by the scheduler: as many of the next ends give no ticket back.
            self.surplus = offer.excess
            log.info("worker %s: offered %d free slots (%d running)", self.worker_id, max(0, usable - held), held)
        finally:
            self._resyncing = None
            gate.set()

    async def _end(self, rid: str, attempt: str, *, outcome: str = "", detail: str = "", reason: str = "",
                   usage: dict[str, Any] | None = None, tail: Tail | None = None, never_ran: bool = False) -> None:
        """End a run: `finish` with an outcome, else hand it back (which only releases the slot when
        the run is no longer ours). Exactly once, retried through dropped connections. `tail`: the run's
        last tokens, which the finish appends. `never_ran`: its start was refused (Transitions.hand_back)."""
        while self._resyncing is not None:
            await self._resyncing.wait()
        self._ending += 1
        try:
            return_slot = not self.stopping and not self.backend_down  # withdrawn: no ticket back (_withdraw)
            if return_slot and self.surplus:  # the slots shrank under this run: its ticket goes
                self.surplus -= 1
                return_slot = False
                if not self.surplus:  # the surplus counted a run whose slot was handed over, maybe: recount
                    self.resync_needed = True

            progress = EndProgress()  # a retry takes up from the step that failed

            async def end() -> None:
                if outcome:
                    await self.store.finish(rid, attempt, outcome=outcome, detail=detail, return_slot=return_slot,
                                            usage=usage, tail=tail, progress=progress)
                else:
                    await self.store.hand_back(rid, attempt, reason=reason, return_slot=return_slot,
                                               never_ran=never_ran, progress=progress)

            try:
                await through_dropped_connections(end, seconds=max(30.0, 10 * self.settings.lease_seconds),
                                                  what=f"run {rid}|{attempt}: ending it")
            except Exception as error:
                if store_unavailable(error):
                    log.error("run %s|%s: could not end it (%s); its lease will lapse", rid, attempt, error)
                else:
                    log.exception("run %s|%s: could not end it; its lease will lapse", rid, attempt)
                self.resync_needed = True  # its ticket may not have come back
        finally:
            self._ending -= 1
            if not self._ending:
                self._ends_quiet.set()

    # ---- one run -----------------------------------------------------------------------------
    async def _serve(self, assignment: Assignment) -> None:
        rid, attempt, key = assignment.request_id, assignment.attempt, assignment.key
        try:
            spec = await self.store.spec(assignment)
            so_far, streamed = "", None
            if spec is not None and spec.start_index:
                so_far, streamed = await self.store.output_so_far(spec)
            if spec is None or key in self.interrupted:  # lost before it started
                await self._end(rid, attempt, reason=self._stop_reason(key), never_ran=spec is None)
                return
            if streamed is not None:  # never preempted (pinned), but its worker was lost or its backend failed
                await self._end(rid, attempt, outcome="failed", detail=cannot_continue(streamed))
                return
            if self.backend_down:  # dispatched before the slots were withdrawn: back to wait, no attempt lost
                await self._end(rid, attempt, reason=f"{BACKEND_DOWN}: its worker's backend is not reachable")
                return
            self.executing.add(key)
            self._show_in_rq(key, spec)
            run = Run(self.store, self.engine, spec, taken_at=assignment.taken_at,
                      interval=self.settings.stream_interval_ms / 1000)
            try:
                outcome = await run.execute(so_far)
            except asyncio.CancelledError:  # a notice (preempted, cancelled, lease lost) or shutdown
                outcome = None
            finally:  # from here on no notice may cancel this task: its end must not be cut short
                self.executing.discard(key)
            if outcome is None and key in self.handing_back and run.unresumable:
                # The shutdown's grace ran out on a pinned run: handed back, it would only fail on the next
                # worker (above), after a `resumed` event and a dispatch. It fails here, and says why.
                grace = self.settings.shutdown_grace_seconds
                log.warning("run %s: still running when the shutdown's grace (%g s) ran out, and it streamed %s, "
                            "which no engine can continue; ending it failed", key, grace, run.unresumable)
                await self._end(rid, attempt, outcome="failed",
                                detail=cannot_continue(run.unresumable, shutdown_grace=grace))
            elif outcome is None:
                await self._end(rid, attempt, reason=self._stop_reason(key))
            elif outcome.kind == "done":
                await self._end(rid, attempt, outcome="done", detail=outcome.detail, usage=outcome.usage,
                                tail=outcome.tail)
            elif outcome.kind == "fenced":
                log.info("run %s fenced (%s)", key, outcome.detail)
                await self._end(rid, attempt, reason=await self._fence_reason(key, outcome.pin_refused))
            elif outcome.transient:  # resumed, possibly elsewhere, unless it was the last attempt (--max-attempts)
                if outcome.backend_down:  # not reached: withdrawn, and (up to a bound) no failed attempt
                    await self._withdraw()
                free = outcome.backend_down and int(attempt) <= FREE_BACKEND_DOWN_STARTS * self.settings.max_attempts
                await self._end(rid, attempt, reason=f"{BACKEND_DOWN if free else 'backend_error'}: {outcome.detail}")
            else:  # a permanent engine error, or a `fail` deadline passed before the first token (deadline_exceeded)
                await self._end(rid, attempt, outcome="failed", detail=outcome.detail)
        except Exception as error:
            if store_unavailable(error):  # Redis unreachable or refusing for long: let the run resume elsewhere
                log.warning("run %s: Redis unavailable (%s); handing it back", key, error)
                await self._end(rid, attempt, reason="worker_redis_error")
            else:  # never silence: the request ends with an error event
                log.exception("run %s failed", key)
                await self._end(rid, attempt, outcome="failed", detail=f"worker error: {error}")
        finally:
            self._show_in_rq(key, None)
            self.executing.discard(key)
            self.interrupted.discard(key)
            self.handing_back.discard(key)
            self.stop_reasons.pop(key, None)
            self.runs.pop(key, None)

    async def _fence_reason(self, key: str, pin_refused: bool) -> str:
        """Why a fenced run stopped. A refused pin on a cluster: the control plane stopped the run (preempted)
        and only this hand-back tells the data plane why (the tenant's `preempted` reason), but the notice
        saying so comes on the control connection and can come after the refusal, or be missed (a reconnect:
        the heartbeats repeat it); waited for, two heartbeats at most. Elsewhere the store fenced the run and
        recorded why itself."""
        if pin_refused and self.settings.redis_cluster and key not in self.interrupted:
            noticed = self.notice_awaited[key] = asyncio.Event()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(noticed.wait(), 2 * self.settings.heartbeat_seconds)
            finally:
                self.notice_awaited.pop(key, None)
        return self._stop_reason(key)

    def _stop_reason(self, key: str) -> str:
        """Why a run stopped before its end: shutting down, or what its notice said (on a cluster the
        hand-back is what records a preemption on the data plane)."""
        if key in self.handing_back:
            return "worker_shutdown"
        return self.stop_reasons.get(key, "released")

    def _notice(self, notice: str) -> None:
        """A control notice "rid|attempt|reason" (reason: priority or cancelled). It can overtake its
        run's assignment (the notice comes on the control connection, the assignment on the inbox
        one): kept a while, it stops the run before its engine is called (on a cluster reading the run's
        spec has started it on the data plane by then: its stream shows `started`, then `preempted`)."""
        rid, attempt, reason = (notice.split("|") + ["", ""])[:3]
        key = f"{rid}|{attempt}"
        if key not in self.runs:  # kept with the early notice (bounded), not for a run that may never come
            self.early_notices[key] = reason
            while len(self.early_notices) > EARLY_NOTICES:
                del self.early_notices[next(iter(self.early_notices))]
        elif reason:
            self.stop_reasons[key] = reason
        self._interrupt(key)

    def _interrupt(self, key: str) -> None:
        if key not in self.runs:
            return
        self.interrupted.add(key)
        if (noticed := self.notice_awaited.get(key)) is not None:
            noticed.set()
        if key in self.executing:
            self.runs[key].cancel()
