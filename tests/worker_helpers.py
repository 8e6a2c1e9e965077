"""Helpers for the worker tests: real `sluicegate worker` processes, a background SSE listener and
the slot-ticket ledger check. Real Valkey and real processes only."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis

from sluicegate.sessions import keys
from sluicegate.sessions.runs import RunStore, shown_info
from sluicegate.settings import Settings
from tests.helpers import ON_CLUSTER, ROOT, SseEvent, Stack, fast_settings, sse, submit, wait_for

TERMINAL = ("done", "error", "cancelled")


class WorkerProcess:
    """One `sluicegate worker` subprocess, its worker id (found by pid in the registry) and its log."""

    def __init__(self, settings: Settings, log_path: str | None = None) -> None:
        env = {**os.environ, **settings.to_env()}
        self.log_path = log_path
        self._log: IO[bytes] | None = open(log_path, "wb") if log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "worker"], env=env, cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stderr=self._log, start_new_session=True)
        self.worker_id = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def registered(self, r: redis.Redis, timeout: float = 20) -> str:
        """Wait until the process registered its slots; returns its worker id."""

        def find() -> str | None:
            assert self.proc.poll() is None, f"worker exited early with {self.proc.returncode}"
            for group in r.smembers(keys.GROUPS):
                for wid in r.hkeys(keys.group_key(group, "workers")):
                    info = shown_info(r.hget(keys.group_key(group, "workers"), wid) or "")
                    if info.get("pid") == self.pid and r.exists(keys.worker(group, wid)):
                        return str(wid)
            return None

        self.worker_id = wait_for(find, timeout=timeout, interval=0.05, what=f"worker pid {self.pid} to register")
        return self.worker_id

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        if not self.log_path:
            return ""
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)  # works on a stopped process too
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()


class Listener:
    """Reads a request's SSE stream in a background thread, noting when each event arrived."""

    def __init__(self, base_url: str, request_id: str, timeout: float = 60) -> None:
        self.events: list[SseEvent] = []
        self.arrived: list[float] = []
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(base_url, request_id, timeout), daemon=True)
        self._thread.start()

    def _read(self, base_url: str, request_id: str, timeout: float) -> None:
        try:
            for event in sse(base_url, f"/v1/requests/{request_id}/events", timeout=timeout):
                with self._changed:
                    self.events.append(event)
                    self.arrived.append(time.monotonic())
                    self._changed.notify_all()
        except BaseException as error:  # noqa: BLE001 - reported by join()
            self.error = error
        finally:
            with self._changed:
                self._changed.notify_all()

    def first(self, predicate: Callable[[SseEvent], bool], timeout: float = 30) -> tuple[SseEvent, float]:
        """The first event matching `predicate` and when it arrived (waits for it)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event, at in zip(self.events, self.arrived, strict=True):
                    if predicate(event):
                        return event, at
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    tail = [(e.event, e.data.get("index")) for e in self.events[-5:]]
                    raise AssertionError(f"no matching event (thread alive: {self._thread.is_alive()}, "
                                         f"error: {self.error!r}, last events: {tail})")
                self._changed.wait(min(left, 0.5))

    def join(self, timeout: float = 60) -> list[SseEvent]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"stream did not end; last events: {self.events[-3:]}"
        assert self.error is None, f"stream failed: {self.error!r}"
        return self.events


def token_indices(events: list[SseEvent]) -> list[int]:
    return [int(e.data["index"]) for e in events if e.event == "token"]


def token_text(events: list[SseEvent]) -> str:
    return "".join(str(e.data["text"]) for e in events if e.event == "token")


def live_slots(r: redis.Redis, group: str = "default") -> Counter[str]:
    """Slots per live worker of a group (liveness key present), from the worker registry."""
    slots: Counter[str] = Counter()
    for wid, info in r.hgetall(keys.group_key(group, "workers")).items():
        if r.exists(keys.worker(group, wid)):
            slots[str(wid)] = int(shown_info(info)["slots"])
    return slots


def idle_tickets(r: redis.Redis, group: str = "default") -> Counter[str]:
    return Counter(str(t) for t in r.lrange(keys.group_key(group, "idle"), 0, -1))


def assert_tickets_balanced(r: redis.Redis, group: str = "default", *, expected_slots: int | None = None,
                            timeout: float = 15) -> None:
    """After all work drained: every live worker has exactly one idle ticket per slot, and no one
    else has any (LLEN sg:g:<G>:idle == total slots of live workers)."""
    seen: list[tuple[Counter[str], Counter[str]]] = []

    def balanced() -> bool:
        running = r.zcard(keys.group_key(group, "run"))
        tickets, slots = idle_tickets(r, group), live_slots(r, group)
        seen[:] = [(tickets, slots)]
        if expected_slots is not None and sum(slots.values()) != expected_slots:
            return False
        return running == 0 and tickets == slots

    try:
        wait_for(balanced, timeout=timeout, interval=0.05, what="the slot tickets to balance")
    except AssertionError as error:
        tickets, slots = seen[0]
        raise AssertionError(f"{error}: idle tickets {dict(tickets)} != live slots {dict(slots)}") from None


def on_loop(stack: Stack) -> Callable[..., Any]:
    """Run a coroutine on the stack's event loop and wait for its result, from the test thread.

    Tests drive async clients (RunStore, Run) through the stack's one loop rather than asyncio.run:
    it stays correct even when something (gevent via an imported locust) turned threads into
    greenlets that share asyncio's notion of the running loop."""

    def run(coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, stack.loop).result(timeout)

    return run


@dataclass
class StreamOnTwoWorkers:
    stack: Stack
    workers: dict[str, WorkerProcess]  # by worker id
    rid: str
    listener: Listener
    running_on: WorkerProcess  # the worker streaming the request
    other_id: str  # the other worker's id


@contextmanager
def stream_on_one_of_two_workers(redis_url: str, r: redis.Redis, log_dir: Path, *, session: str, prompt: str,
                                 max_tokens: int, past_index: int) -> Iterator[StreamOnTwoWorkers]:
    """API and scheduler in process, two `sluicegate worker` processes (2 slots each, 100 tokens/s,
    1.5 s leases), and one request streaming on one of them, past token `past_index`."""
    settings = fast_settings(redis_url, sim_tokens_per_second=100.0, lease_seconds=1.5, heartbeat_seconds=0.3,
                             slots=2)
    stack = Stack(settings).start(workers=0)  # API + scheduler (its sweep requeues expired leases)
    processes = [WorkerProcess(settings, str(log_dir / f"w{i}.log")) for i in range(2)]
    try:
        by_id = {w.registered(r): w for w in processes}
        rid = submit(stack.base_url, session, prompt=prompt, max_tokens=max_tokens)
        listener = Listener(stack.base_url, rid)
        started, _ = listener.first(lambda e: e.event == "started")
        running_on = by_id[started.data["worker"]]
        (other_id,) = set(by_id) - {running_on.worker_id}
        listener.first(lambda e: e.event == "token" and e.data["index"] >= past_index)
        yield StreamOnTwoWorkers(stack, by_id, rid, listener, running_on, other_id)
    finally:
        for w in processes:
            w.close()
        stack.stop()


@contextmanager
def api_and_two_played_workers(redis_url: str, first: str, second: str
                               ) -> Iterator[tuple[Stack, Callable[..., Any], RunStore, RunStore]]:
    """The API alone (no scheduler, no worker process) and two worker stores for the test to play
    workers with, by id; `run` drives them on the stack's loop."""
    stack = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)
    run = on_loop(stack)
    stores = [RunStore.connect(redis_url, worker_id=wid, group="default", lease_seconds=30, session_ttl=60,
                               cluster=ON_CLUSTER)
              for wid in (first, second)]
    try:
        yield stack, run, stores[0], stores[1]
    finally:
        for store in stores:
            run(store.aclose())
        stack.stop()
