"""The worker's presence in rq: registered as an rq worker of queue `sluicegate.<group>`.

This is where rq earns its place: `rq info` and rq-dashboard list every Sluicegate worker with its
group, state and heartbeat, and rq's worker registry is the operators' view of the fleet. Requests
are not dispatched as rq jobs (a job lifecycle costs more than the whole time-to-first-token budget;
see the README's "How rq is used"), but the requests a worker is running are *shown* in rq as it
would show its own: the worker is `busy`, and each running request is a Job record in status
`started` (description naming the request), with an rq Execution in the worker's execution index
and in the queue's StartedJobRegistry, which is what `rq info` counts as "executing" and what
`Worker.get_current_job()` and rq-dashboard read.

Cheap by construction: the worker calls `show` with the runs it executes; a call writes only the
difference from what rq shows, bursts are coalesced by the caller, and between changes nothing is
written but the periodic heartbeat. A beat renews only the records that would expire within 2.5 beats
(a run shorter than about a third of the TTL is never renewed). The records are written by one script
call a change (`lua/rq_show.lua`; rq's own heartbeat and busy/idle state go in a pipeline beside it)
with the fields and keys rq itself writes, taken once from rq's own classes
(`RqRecords`): through rq's objects and a redis-py pipeline, a run cost fourteen commands packed and
parsed and a Job built and serialized, and the presence was a fifth of a worker's CPU in the soak.
Nothing outlives a run: its records are deleted when it ends, and they all expire on their own if
the worker dies (the Job hash first, so that rq's cleanup of the StartedJobRegistry finds no job to
move to the FailedJobRegistry).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import redis
from rq import Queue
from rq import Worker as RqWorker
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.utils import current_timestamp, now, utcformat

JOB_FUNC = "sluicegate.request"  # never executed: names what the job stands for in rq's tooling
EXPIRY_MARGIN = 5  # seconds the execution records outlive their Job hash (see the module doc)
RENEW_WITHIN_BEATS = 2.5  # a beat renews the records that would expire within this many beats (a late
# beat, its thread behind the worker's other work, still comes before they expire)
PER_RUN_FIELDS = ("description", "meta", "created_at", "started_at")  # the Job fields a run sets itself
SHOW_SCRIPT = (Path(__file__).parent / "lua" / "rq_show.lua").read_text()


def rq_queue_name(group: str) -> str:
    return f"sluicegate.{group}"


def rq_job_id(request_id: str, attempt: str) -> str:
    """One rq job per attempt: a request preempted here and resumed elsewhere is two runs at once for a
    moment, and neither's end may delete the other's record. rq accepts [A-Za-z0-9_-] only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{request_id}-a{attempt}")


@dataclass
class Shown:
    """What rq shows of one run, and when its records expire unless renewed (time.monotonic())."""

    job_id: str
    execution_id: str
    expires_at: float


class RqRecords:
    """rq's names and field values for a started job of this worker, taken once from rq's own classes
    (a prototype Job's fields, the key templates), so that a run costs a few strings, not rq's objects."""

    def __init__(self, connection: redis.Redis, queue: Queue, worker_name: str) -> None:
        prototype = Job.create(JOB_FUNC, connection=connection, id="prototype", origin=queue.name,
                               status=JobStatus.STARTED, timeout=-1, description="", meta={})
        prototype.worker_name = worker_name
        self.serializer = prototype.serializer
        self.constant_fields = [part for name, value in prototype.to_dict().items() if name not in PER_RUN_FIELDS
                                for part in (name, value)]
        self.job_prefix = Job.redis_job_namespace_prefix
        self.execution_prefix = Execution(id="E", job_id="J", connection=connection).key.removesuffix("J:E")
        self.started_registry = StartedJobRegistry(queue=queue).key
        self.worker_executions = WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name)
        self.worker_name = worker_name

    def keys(self, shown: Shown) -> list[str]:
        """The run's Job hash, Execution hash and the job's ExecutionRegistry."""
        return [self.job_prefix + shown.job_id, f"{self.execution_prefix}{shown.job_id}:{shown.execution_id}",
                ExecutionRegistry.key_template.format(shown.job_id)]

    def execution_id(self, job_id: str) -> str:
        """The same for the same run on this worker (rq's are random): a write resent after a lost reply,
        or after registering again, overwrites its records instead of leaving a second set behind."""
        return uuid5(NAMESPACE_URL, f"rq-execution:{self.worker_name}:{job_id}").hex


class RqPresence:
    """Registered as an rq worker; `show` every `beat_seconds` (and at each change of its runs) keeps the
    registration alive (its key expires `ttl_seconds` after the last beat, so a killed worker leaves
    rq's view on its own) and shows the runs. Thread-safe: called through asyncio.to_thread."""

    def __init__(self, redis_url: str, *, group: str, worker_id: str, ttl_seconds: int) -> None:
        self._connection = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._queue = Queue(rq_queue_name(group), connection=self._connection)
        self._name = worker_id
        # Made at the first birth, not here: rq's Worker talks to its server at once (CLIENT SETNAME), and
        # an rq server down must not keep the worker from starting (its next beat registers it).
        self._worker: RqWorker | None = None
        self._ttl = ttl_seconds
        self.beat_seconds = max(1.0, ttl_seconds / 4)
        self._born = False
        self._busy: bool | None = None  # the state rq shows (None: not written since birth)
        self._next_beat = 0.0
        self._records = RqRecords(self._connection, self._queue, worker_id)
        self._show = self._connection.register_script(SHOW_SCRIPT)
        self._shown: dict[str, Shown] = {}  # run key "rid|attempt" -> what rq shows of it
        self._dead = False  # death() ran: a `show` still queued behind it writes nothing
        self._lock = threading.Lock()

    def next_beat_in(self) -> float:
        """Seconds until a beat is due (0: now)."""
        return max(0.0, self._next_beat - time.monotonic())

    def birth(self) -> None:
        with self._lock:
            self._birth()

    def _birth(self) -> None:
        if self._worker is None:
            self._worker = RqWorker([self._queue], name=self._name, connection=self._connection,
                                    worker_ttl=self._ttl)
        self._worker.register_birth()
        self._busy = bool(self._shown)
        self._worker.set_state("busy" if self._busy else "idle")
        self._born = True
        self._next_beat = time.monotonic() + self.beat_seconds

    def would_write(self, runs: Mapping[str, Mapping[str, Any]]) -> bool:
        """Whether `show(runs)` would write anything now: a beat is due, or runs start or stop being
        shown. The caller skips the thread hop to `show` when not."""
        with self._lock:
            return time.monotonic() >= self._next_beat or runs.keys() != self._shown.keys()

    def show(self, runs: Mapping[str, Mapping[str, Any]]) -> None:
        """Make rq show exactly `runs` ("rid|attempt" -> request_id, attempt and what else describes it),
        and beat when a beat is due. Writes nothing when neither is the case."""
        with self._lock:
            # A call queued in a thread before the worker's end, run after it, would register the worker
            # again (its connection reconnects) and show runs that are gone.
            if self._dead:
                return
            due = time.monotonic() >= self._next_beat
            stale: dict[str, Shown] = {}
            if due and (self._worker is None or not self._born or not self._connection.exists(self._worker.key)):
                # The registration failed (Redis was away) or was lost (Redis restarted empty, or the key
                # lapsed): register again, show every run afresh, and delete what is left of the others.
                stale, self._shown = self._shown, {}
                self._birth()
            started = [key for key in runs if key not in self._shown]
            ended = [key for key in self._shown if key not in runs]
            if not (started or ended or due):
                return
            moment = time.monotonic()
            gone = [self._shown[key] for key in ended] + [shown for key, shown in stale.items() if key not in runs]
            renewed = [shown for key, shown in self._shown.items()
                       if key in runs and needs_renewal(shown, moment, self.beat_seconds)] if due else []
            new = {key: self._new(runs[key]) for key in started}
            self._write(new, gone, renewed)
            for key in ended:
                del self._shown[key]
            for shown in renewed:
                shown.expires_at = moment + self._ttl
            self._shown.update((key, shown) for key, (shown, _) in new.items())
            busy = bool(self._shown)
            assert self._worker is not None  # made by a _birth: above, or at an earlier beat
            if due or busy != self._busy:
                with self._connection.pipeline(transaction=False) as pipe:
                    if busy != self._busy:
                        self._worker.set_state("busy" if busy else "idle", pipeline=pipe)
                    if due:
                        self._worker.heartbeat(self._ttl, pipeline=pipe)
                    pipe.execute()
                self._busy = busy
            if due:
                self._next_beat = time.monotonic() + self.beat_seconds

    def _new(self, run: Mapping[str, Any]) -> tuple[Shown, list[Any]]:
        """A run's records: what rq will show, and the values the script writes for it."""
        rid, attempt = str(run["request_id"]), str(run["attempt"])
        details = ", ".join(f"{name} {run[name]}" for name in ("session_id", "tenant", "priority")
                            if run.get(name) is not None)
        job_id = rq_job_id(rid, attempt)
        shown = Shown(job_id, self._records.execution_id(job_id), time.monotonic() + self._ttl)
        stamp = utcformat(now())
        return shown, [shown.job_id, shown.execution_id,
                       f"sluicegate request {rid} (attempt {attempt}{', ' + details if details else ''})",
                       self._records.serializer.dumps({str(k): v for k, v in run.items()}), stamp, stamp]

    def _write(self, new: Mapping[str, tuple[Shown, list[Any]]], gone: list[Shown], renewed: list[Shown]) -> None:
        """One script call: the ended runs' records deleted, the new ones' written, the others renewed."""
        if not (new or gone or renewed):
            return
        keys = [self._records.started_registry, self._records.worker_executions]
        args: list[Any] = [len(gone), len(new), len(renewed), self._ttl, self._ttl + EXPIRY_MARGIN,
                           repr(time.time()), current_timestamp(), self._name,
                           len(self._records.constant_fields) // 2, *self._records.constant_fields]
        for shown in gone:
            keys += self._records.keys(shown)
            args += (shown.job_id, shown.execution_id)
        for shown, values in new.values():
            keys += self._records.keys(shown)
            args += values
        for shown in renewed:
            keys += self._records.keys(shown)
            args += (shown.job_id, shown.execution_id)
        self._show(keys=keys, args=args)

    def death(self) -> None:
        """Gone for good: no run shown, no registration."""
        with self._lock:
            self._dead = True
            try:
                if self._shown:
                    self._write({}, list(self._shown.values()), [])
                    self._shown.clear()
                if self._worker is not None:  # else never registered: nothing to take back
                    self._worker.register_death()
            finally:
                self._connection.close()


def needs_renewal(shown: Shown, moment: float, beat_seconds: float) -> bool:
    """The run's records would expire within RENEW_WITHIN_BEATS beats: this beat renews them."""
    return shown.expires_at - moment < RENEW_WITHIN_BEATS * beat_seconds
