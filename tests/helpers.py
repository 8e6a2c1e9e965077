"""Test helpers: an in-process stack (API + scheduler + workers on one background loop), HTTP and SSE
clients, subprocess components for crash tests. Real Valkey only, never a mock."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from sluicegate.embedded import free_port
from sluicegate.scheduler.loop import Scheduler
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from sluicegate.sessions.events import SseParser
from sluicegate.settings import Settings
from sluicegate.workers.engines.base import Engine
from sluicegate.workers.worker import Worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite's second pass: the same tests on an embedded 3-master cluster (tests/conftest.py).
ON_CLUSTER = os.environ.get("SLUICEGATE_TEST_CLUSTER") == "1"
T = TypeVar("T")


def fast_settings(redis_url: str, **overrides: Any) -> Settings:
    """Settings tuned for tests: quick sim engine, short leases and sweeps; no backend probe (tests that
    count a backend's requests would count it: the tests of the probe turn it on)."""
    base = Settings(redis_url=redis_url, sim_tokens_per_second=400.0, sim_prefill_ms=0.0, lease_seconds=1.5,
                    heartbeat_seconds=0.3, sweep_seconds=0.05, shutdown_grace_seconds=2.0, slots=4,
                    sse_ping_seconds=1.0, log_level="warning", redis_cluster=ON_CLUSTER, backend_probe=False)
    return base.replace(**overrides)


@dataclass
class Stack:
    """API, scheduler and workers running on one asyncio loop in a background thread."""

    settings: Settings
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    port: int = 0
    _thread: threading.Thread | None = None
    _server: uvicorn.Server | None = None
    _stops: dict[str, asyncio.Event] = field(default_factory=dict)
    _tasks: dict[str, Future[Any]] = field(default_factory=dict)
    workers: dict[str, Worker] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, *, api: bool = True, scheduler: bool = True, workers: int = 1) -> Stack:
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        if api:
            from sluicegate.api.app import create_app
            from sluicegate.api.joined_writes import JoinedWritesProtocol

            self.port = free_port()
            config = uvicorn.Config(create_app(self.settings), host="127.0.0.1", port=self.port, log_level="warning",
                                    access_log=False, lifespan="on", http=JoinedWritesProtocol)  # as `sluicegate api`
            self._server = uvicorn.Server(config)
            self._tasks["api"] = asyncio.run_coroutine_threadsafe(self._server.serve(), self.loop)
            deadline = time.monotonic() + 15
            while not self._server.started:
                if time.monotonic() > deadline:
                    raise TimeoutError("API did not start")
                time.sleep(0.02)
        if scheduler:
            self.start_service("scheduler", lambda stop: Scheduler(self.settings).run(stop))
        for _ in range(workers):
            self.add_worker()
        return self

    def start_service(self, name: str, run: Callable[[asyncio.Event], Any]) -> None:
        async def make_event() -> asyncio.Event:
            return asyncio.Event()

        stop = self._call(make_event())
        self._stops[name] = stop
        self._tasks[name] = asyncio.run_coroutine_threadsafe(run(stop), self.loop)

    def add_worker(self, *, engine: Engine | None = None, **overrides: Any) -> str:
        settings = self.settings.replace(**overrides)

        async def make() -> Worker:
            return Worker(settings, engine=engine, use_rq=False)

        worker = self._call(make())
        self.workers[worker.worker_id] = worker
        self.start_service(worker.worker_id, worker.run)
        deadline = time.monotonic() + 10
        while not self._call(worker.redis.exists(keys.worker(worker.settings.group, worker.worker_id))):
            if time.monotonic() > deadline:
                raise TimeoutError("worker did not register")
            time.sleep(0.02)
        return worker.worker_id

    def stop_service(self, name: str, timeout: float = 30) -> None:
        stop = self._stops.pop(name, None)
        if stop is not None:
            self.loop.call_soon_threadsafe(stop.set)
            self._tasks.pop(name).result(timeout)
        self.workers.pop(name, None)

    def stop(self) -> None:
        for name in list(self._stops):
            with contextlib.suppress(Exception):  # best effort at teardown
                self.stop_service(name)
        if self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                self._tasks["api"].result(15)

        async def cancel_leftovers() -> None:  # e.g. sse-starlette's shutdown watcher
            current = asyncio.current_task()
            leftovers = [t for t in asyncio.all_tasks() if t is not current]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(cancel_leftovers(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)


def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
            return response.status, (json.loads(payload) if payload else None)
    except urllib.error.HTTPError as error:
        payload = error.read()
        try:
            return error.code, json.loads(payload)
        except ValueError:
            return error.code, payload


def healthy(base: str) -> bool:
    """The API at `base` answers its liveness route (a refused or dropped connection: not yet, or gone)."""
    try:
        return call("GET", f"{base}/healthz")[0] == 200
    except OSError:
        return False


def submit(base_url: str, session_id: str, **body: Any) -> str:
    body.setdefault("prompt", "hello")
    body.setdefault("max_tokens", 10)
    code, reply = call("POST", f"{base_url}/v1/sessions/{session_id}/requests", body)
    assert code == 202, (code, reply)
    return reply["request_id"]


@dataclass
class SseEvent:
    id: int
    event: str
    data: dict[str, Any]


def sse(base_url: str, path: str, *, last_id: int | str | None = None, stop_after: int | None = None,
        timeout: float = 60, until: Callable[[SseEvent], bool] | None = None) -> Iterator[SseEvent]:
    """Events from an SSE endpoint; stops at the stream's end, after `stop_after` events, or when `until` is true."""
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    if response.status != 200:
        raise AssertionError(f"GET {path} -> {response.status}: {response.read()!r}")
    parser = SseParser()
    seen = 0
    try:
        while True:
            line = response.readline()
            if not line:
                return
            wire = parser.feed(line)
            if wire is not None:
                event = SseEvent(int(str(wire.id)), wire.event, json.loads(wire.data))
                yield event
                seen += 1
                if (stop_after and seen >= stop_after) or (until and until(event)):
                    return
    finally:
        connection.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """wait_for's form for a test's event loop: polls `condition` without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def children(pid: int) -> list[int]:
    """The pids of a process's children (from /proc: no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def cmdline(pid: int) -> str:
    """A process's command line, "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def spawn(role: str, settings: Settings, *args: str) -> subprocess.Popen[bytes]:
    """A real `sluicegate <role>` process (for kill -9 and multi-process tests)."""
    env = {**os.environ, **settings.to_env()}
    return subprocess.Popen([sys.executable, "-m", "sluicegate", role, *args], env=env, cwd=ROOT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def read_http_request(conn: socket.socket) -> bytes:
    """Read one HTTP request whole from a raw socket (head and content-length body) and return its body: a
    receiver that answers and closes with bytes unread resets the connection, which its sender takes as a
    failed attempt."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return body


def with_redis(redis_url: str, use: Callable[[Any], Awaitable[T]]) -> T:
    """Run `use(client)` with an asyncio client of the test server (a cluster client on a cluster)."""
    async def main() -> T:
        client = async_client(redis_url, cluster=ON_CLUSTER)
        try:
            return await use(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def stored_requests(r: Any) -> int:
    """Request hashes in the store, not their input keys (`r:ID:in`, deleted when a request ends: counted, a
    request that ended between two counts made them differ)."""
    return len([key for key in r.keys("sg:{s:*}:r:*") if not key.endswith(":in")])


def run_sluicegate(*args: str, env: dict[str, str] | None = None,
                   timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`sluicegate ARGS` to its end, output captured, with none of this environment's SLUICEGATE_* settings
    (plus `env`)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    return subprocess.run([sys.executable, "-m", "sluicegate", *args], env={**clean, **(env or {})}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def response_deadline(seconds: float) -> Iterator[None]:
    """The apps created meanwhile (Stack.start) have a response deadline of `seconds` (api/deadline.py; the
    default 5 s would make the tests that wait it out slow)."""
    from sluicegate.api import app as app_module
    from sluicegate.api.deadline import ResponseDeadline

    create_app = app_module.create_app

    def create_app_with_the_deadline(settings: Settings) -> Any:
        app = create_app(settings)
        for middleware in app.user_middleware:
            if middleware.cls is ResponseDeadline:
                middleware.kwargs["seconds"] = seconds
        return app

    app_module.create_app = create_app_with_the_deadline  # type: ignore[assignment]
    try:
        yield
    finally:
        app_module.create_app = create_app
