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
difference from what rq shows (one pipeline), bursts are coalesced by the caller, and between
changes nothing is written but the periodic heartbeat. A beat renews only the records that would
expire within 2.5 beats (a run shorter than about a third of the TTL is never renewed), and one
StartedJobRegistry serves every record: rq builds one per access, and its serializer check (a
runtime Protocol isinstance) was a quarter of the presence's CPU. Before both, the rq presence was
37% of a worker's CPU in the soak; after, 30% of a worker's CPU that fell by a fifth (README).
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
from typing import Any

import redis
from rq import Queue
from rq import Worker as RqWorker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.utils import now

JOB_FUNC = "sluicegate.request"  # never executed: names what the job stands for in rq's tooling
EXPIRY_MARGIN = 5  # seconds the execution records outlive their Job hash (see the module doc)
RENEW_WITHIN_BEATS = 2.5  # a beat renews the records that would expire within this many beats (a late
# beat, its thread behind the worker's other work, still comes before they expire)


def rq_queue_name(group: str) -> str:
    return f"sluicegate.{group}"


def rq_job_id(request_id: str, attempt: str) -> str:
    """One rq job per attempt: a request preempted here and resumed elsewhere is two runs at once for a
    moment, and neither's end may delete the other's record. rq accepts [A-Za-z0-9_-] only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{request_id}-a{attempt}")


class ShownJob(Job):
    """A Job whose StartedJobRegistry is the presence's one (rq's Execution reads it per call)."""

    registry: StartedJobRegistry

    @property
    def started_job_registry(self) -> StartedJobRegistry:
        return self.registry


@dataclass
class Shown:
    """What rq shows of one run, and when its records expire unless renewed (time.monotonic())."""

    job: ShownJob
    execution: Execution
    expires_at: float


class RqPresence:
    """Registered as an rq worker; `show` every `beat_seconds` (and at each change of its runs) keeps the
    registration alive (its key expires `ttl_seconds` after the last beat, so a killed worker leaves
    rq's view on its own) and shows the runs. Thread-safe: called through asyncio.to_thread."""

    def __init__(self, redis_url: str, *, group: str, worker_id: str, ttl_seconds: int) -> None:
        self._connection = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._queue = Queue(rq_queue_name(group), connection=self._connection)
        self._worker = RqWorker([self._queue], name=worker_id, connection=self._connection,
                                worker_ttl=ttl_seconds)
        self._ttl = ttl_seconds
        self.beat_seconds = max(1.0, ttl_seconds / 4)
        self._born = False
        self._next_beat = 0.0
        self._registry = StartedJobRegistry(queue=self._queue)
        self._shown: dict[str, Shown] = {}  # run key "rid|attempt" -> what rq shows of it
        self._lock = threading.Lock()

    def next_beat_in(self) -> float:
        """Seconds until a beat is due (0: now)."""
        return max(0.0, self._next_beat - time.monotonic())

    def birth(self) -> None:
        with self._lock:
            self._birth()

    def _birth(self) -> None:
        self._worker.register_birth()
        self._worker.set_state("busy" if self._shown else "idle")
        self._born = True
        self._next_beat = time.monotonic() + self.beat_seconds

    def show(self, runs: Mapping[str, Mapping[str, Any]]) -> None:
        """Make rq show exactly `runs` ("rid|attempt" -> request_id, attempt and what else describes it),
        and beat when a beat is due. Writes nothing when neither is the case."""
        with self._lock:
            due = time.monotonic() >= self._next_beat
            if due and (not self._born or not self._connection.exists(self._worker.key)):
                self._shown.clear()  # the registration failed (Redis was away) or was lost (Redis restarted
                self._birth()  # empty): register again, and show every run afresh
            started = [key for key in runs if key not in self._shown]
            ended = [key for key in self._shown if key not in runs]
            if not (started or ended or due):
                return
            with self._connection.pipeline(transaction=False) as pipe:
                for key in ended:
                    shown = self._shown.pop(key)
                    shown.execution.delete(shown.job, pipe)
                    pipe.delete(shown.job.key)
                for key in started:
                    self._shown[key] = self._start(runs[key], pipe)
                if started or ended:
                    self._worker.set_state("busy" if self._shown else "idle", pipeline=pipe)
                if due:
                    self._worker.heartbeat(self._ttl, pipeline=pipe)
                    self._renew(pipe)
                pipe.execute()
            if due:
                self._next_beat = time.monotonic() + self.beat_seconds

    def _renew(self, pipe: Any) -> None:
        """Keep the records of the runs that outlive the next beat as long as the worker's registration."""
        moment = time.monotonic()
        for shown in self._shown.values():
            if shown.expires_at - moment < RENEW_WITHIN_BEATS * self.beat_seconds:
                pipe.expire(shown.job.key, self._ttl)
                shown.execution.heartbeat(self._registry, self._ttl + EXPIRY_MARGIN, pipe)
                shown.expires_at = moment + self._ttl

    def _start(self, run: Mapping[str, Any], pipe: Any) -> Shown:
        rid, attempt = str(run["request_id"]), str(run["attempt"])
        details = ", ".join(f"{name} {run[name]}" for name in ("session_id", "tenant", "priority")
                            if run.get(name) is not None)
        job = ShownJob.create(JOB_FUNC, connection=self._connection, id=rq_job_id(rid, attempt),
                         origin=self._queue.name, status=JobStatus.STARTED, timeout=-1,
                         description=f"sluicegate request {rid} (attempt {attempt}{', ' + details if details else ''})",
                         meta={str(k): v for k, v in run.items()})
        job.registry = self._registry
        job.started_at = now()
        job.worker_name = self._worker.name
        job.save(pipeline=pipe)
        pipe.expire(job.key, self._ttl)
        expires_at = time.monotonic() + self._ttl
        execution = Execution.create(job, ttl=self._ttl + EXPIRY_MARGIN, pipeline=pipe, worker_name=self._worker.name)
        return Shown(job, execution, expires_at)

    def death(self) -> None:
        """Gone for good: no run shown, no registration."""
        with self._lock:
            try:
                if self._shown:
                    with self._connection.pipeline(transaction=False) as pipe:
                        for shown in self._shown.values():
                            shown.execution.delete(shown.job, pipe)
                            pipe.delete(shown.job.key)
                        pipe.execute()
                    self._shown.clear()
                self._worker.register_death()
            finally:
                self._connection.close()
