"""The worker's presence in rq: registered as an rq worker of queue `sluicegate.<group>`.

This is where rq earns its place: `rq info` and rq-dashboard list every Sluicegate worker with its
group, state and heartbeat, and rq's worker registry is the operators' view of the fleet. Requests
themselves never become rq jobs (a job lifecycle costs more than the whole time-to-first-token
budget); see the README's "How rq is used".
"""

from __future__ import annotations

import redis
from rq import Queue
from rq import Worker as RqWorker


def rq_queue_name(group: str) -> str:
    return f"sluicegate.{group}"


class RqPresence:
    """Registered as an rq worker; `beat` every `beat_seconds` keeps the registration alive (its key
    expires `ttl_seconds` after the last beat, so a killed worker leaves rq's view on its own)."""

    def __init__(self, redis_url: str, *, group: str, worker_id: str, ttl_seconds: int) -> None:
        self._connection = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        queue = Queue(rq_queue_name(group), connection=self._connection)
        self._worker = RqWorker([queue], name=worker_id, connection=self._connection, worker_ttl=ttl_seconds)
        self._ttl = ttl_seconds
        self.beat_seconds = max(1.0, ttl_seconds / 4)
        self._born = False

    def birth(self) -> None:
        self._worker.register_birth()
        self._worker.set_state("idle")
        self._born = True

    def beat(self, busy_slots: int) -> None:
        if not self._born or not self._connection.exists(self._worker.key):
            self.birth()  # the registration failed (Redis was away) or was lost (Redis restarted empty)
        self._worker.heartbeat(self._ttl)
        self._worker.set_state("busy" if busy_slots else "idle")

    def death(self) -> None:
        self._worker.register_death()
        self._connection.close()
