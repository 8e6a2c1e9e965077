"""Fault drills: kill or cut off one part of a running stack under load; nothing accepted is lost or doubled.

Each drill starts its own stack as separate processes (a persistent Valkey, `sluicegate api` x1 or x2, a
scheduler, two sim workers) and an asyncio client that submits at a steady rate and follows every
accepted request's events, resuming with Last-Event-ID after any cut (a 409 on resume, e.g. the log
epoch's `cursor_expired` after a rollback, restarts the read from the request's first event and is
counted). After the fault every accepted request must end `done` and a full replay of its events
(GET /v1/requests/{id}/events, no cursor) must carry token indices 0..n-1, each once.

- valkey-always, valkey-everysec: kill -9 of Valkey, restart in place on the same AOF. With `always` no
  accepted request may be lost; with `everysec` the losses are reported (the last ~1 s may go; a kill -9
  of the process alone loses nothing, as the AOF is written before the reply). A submit during the
  outage must get a 503 (with Retry-After, or `maybe_stored` naming the request when its call was already
  sent) or a connection error, never another 5xx.
- api: two API processes on one Valkey; kill -9 of the one the clients stream through: they resume
  through the other. Reported: the resume gap (cut -> stream open again, cut -> next event).
- blackhole: a loopback TCP proxy between the stack and Valkey stops forwarding (connections stay open,
  bytes wait, as TCP retransmits would) for --blackhole-seconds. Reported: the slowest API answer while
  it lasts (must stay under --max-hang-seconds) and the time to the first accepted submit after it.
- scheduler: kill -9 of the scheduler under load: running and queued work goes on (dispatch is inline);
  then one worker is killed too, so its runs' leases lapse with no sweep to hand them back: they wait
  until a new scheduler starts, then everything completes.

Exits non-zero on any lost accepted request (outside the everysec window), doubled or missing token
index, request that never completed, or a 5xx other than 503.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from sluicegate.embedded import EmbeddedServer, free_port
from sluicegate.loadtest.common import (
    Component,
    client_session,
    percentile,
    print_table,
    progress,
    sse_events,
    wait_http,
    write_result,
)

DRILLS = ("valkey", "api", "blackhole", "scheduler")
TERMINAL = ("done", "error", "cancelled")
EVERYSEC_WINDOW_S = 2.0  # accepted this close before a kill, a loss with appendfsync everysec is allowed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drill", choices=("all", *DRILLS, "valkey-always", "valkey-everysec"), default="all",
                        help="which drill(s) to run (valkey: both fsync modes)")
    parser.add_argument("--requests", type=int, default=120, help="submits per drill (spread over --seconds)")
    parser.add_argument("--seconds", type=float, default=12.0, help="load duration per drill")
    parser.add_argument("--tokens-per-second", type=float, default=100.0, help="sim pace per request")
    parser.add_argument("--max-tokens", type=int, default=120, help="largest request (each draws 20..this)")
    parser.add_argument("--blackhole-seconds", type=float, default=10.0, help="how long the proxy forwards nothing")
    parser.add_argument("--max-hang-seconds", type=float, default=6.0,
                        help="slowest acceptable API answer while Redis is black-holed")
    parser.add_argument("--everysec-loss-seconds", type=float, default=1.0,
                        help="valkey-everysec: drop what the AOF got in the last S seconds before the kill (a power "
                             "loss; a kill -9 alone loses nothing, the AOF is written before the reply); 0: kill only")
    parser.add_argument("--drain-seconds", type=float, default=60.0, help="time for every accepted request to end")


# ---- a loopback proxy that can black-hole ---------------------------------------------------------------


class BlackholeProxy:
    """A TCP proxy on 127.0.0.1 in front of Valkey, in a thread of its own (a busy client loop must not slow it).

    `cut(True)` stops forwarding in both directions without closing anything: bytes read wait in the proxy,
    the rest in the kernel's buffers, and new connections are accepted but not connected upstream, which is
    what a network blackhole looks like to both ends (TCP retransmits deliver it all once it lifts)."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="blackhole-proxy", daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> BlackholeProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self, on: bool) -> None:
        async def flip() -> None:
            assert self._open is not None
            if on:
                self._open.clear()
            else:
                self._open.set()

        asyncio.run_coroutine_threadsafe(flip(), self._loop).result(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        self._writers.add(writer)
        try:
            await self._open.wait()
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        assert self._open is not None
        try:
            while data := await src.read(1 << 16):
                await self._open.wait()
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# ---- the stack ------------------------------------------------------------------------------------------


@dataclass
class DrillStack:
    """Valkey (persistent, fixed port: restartable in place), optionally the proxy, N APIs, a scheduler, 2 workers."""

    apis: int = 1
    appendfsync: str = "always"
    proxy: bool = False
    tokens_per_second: float = 100.0
    server: EmbeddedServer | None = None
    blackhole: BlackholeProxy | None = None
    api_parts: list[Component] = field(default_factory=list)
    api_ports: list[int] = field(default_factory=list)
    scheduler: Component | None = None
    workers: list[Component] = field(default_factory=list)
    data_dir: str = ""

    @property
    def redis_url(self) -> str:
        assert self.server is not None
        if self.blackhole is not None:
            return f"redis://127.0.0.1:{self.blackhole.port}/0"
        return self.server.url

    @property
    def bases(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.api_ports]

    def worker_flags(self) -> list[str]:
        return ["--redis-url", self.redis_url, "--slots", "8", "--sim-prefill-ms", "5",
                "--sim-tokens-per-second", str(self.tokens_per_second)]

    def start(self) -> DrillStack:
        self.data_dir = tempfile.mkdtemp(prefix="sg-drill-valkey-")
        self.server = EmbeddedServer(data_dir=self.data_dir, port=free_port(), persistent=True,
                                     appendfsync=self.appendfsync).start()
        if self.proxy:
            self.blackhole = BlackholeProxy(self.server.port).start()
        self.api_ports = [free_port() for _ in range(self.apis)]
        self.api_parts = [Component("api", ["--redis-url", self.redis_url, "--port", str(p), "--sse-ping-seconds", "2"])
                          .start() for p in self.api_ports]
        self.scheduler = self.start_scheduler()
        self.workers = [Component("worker", self.worker_flags()).start() for _ in range(2)]
        for base, part in zip(self.bases, self.api_parts, strict=True):
            wait_http(f"{base}/healthz", process=part.process)
        self.wait_workers(2)
        return self

    def start_scheduler(self) -> Component:
        return Component("scheduler", ["--redis-url", self.redis_url]).start()

    def wait_workers(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.bases[-1]}/v1/admin/stats", timeout=2) as response:
                    if len(json.loads(response.read()).get("workers") or ()) >= count:
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{count} workers did not register in {timeout:g} s")

    def restart_valkey(self) -> None:
        """Start the killed server again on the same port and AOF."""
        assert self.server is not None
        self.server.process = None
        self.server.start(timeout=30)

    def log_tails(self, lines: int = 15) -> str:
        """The end of each component's log (read before stop(), which deletes them): for a failed drill."""
        out = []
        for part in [*self.api_parts, *([self.scheduler] if self.scheduler else []), *self.workers]:
            if part.log_path is not None and part.log_path.is_file():
                tail = part.log_path.read_text(errors="replace").splitlines()[-lines:]
                if tail:
                    out.append(f"--- {part.role} {part.pid} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        for part in [*self.api_parts, *([self.scheduler] if self.scheduler else []), *self.workers]:
            part.stop(timeout=10)
        if self.blackhole is not None:
            self.blackhole.stop()
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# ---- the client -----------------------------------------------------------------------------------------


@dataclass
class Call:
    """One API call the drill made: when (seconds since the load began), how long, and how it ended."""

    what: str
    started: float
    seconds: float
    status: int  # 0: no HTTP answer (connection refused, reset, timed out)
    error: str = ""
    retry_after: bool = False
    # a submit's 503 `maybe_stored` (X-Request-Id, x-should-retry: false): its call was sent and may have been
    # stored (a store that stalls runs it once it resumes), so it says not to retry, and has no Retry-After
    maybe_stored: bool = False


@dataclass
class Tracked:
    """An accepted request and what its live follower saw."""

    rid: str
    max_tokens: int
    accepted_at: float
    indices: list[int] = field(default_factory=list)
    live_anomalies: int = 0  # a token index out of order on the live stream (doubled or skipped)
    restarts: int = 0  # 409 on resume: read again from the first event
    cuts: int = 0
    reopen_gaps: list[float] = field(default_factory=list)  # cut -> stream open again (200)
    event_gaps: list[float] = field(default_factory=list)  # cut -> next event received
    worker: str = ""  # the worker of its latest `started` / `resumed` event
    resumed_at: list[float] = field(default_factory=list)
    end: str | None = None
    missing: bool = False  # 404: the request is gone
    replay: str = ""  # "" ok, else what was wrong with the full replay


class Load:
    """Submits at a steady rate and follows every accepted request to its end, resuming through cuts."""

    def __init__(self, http: aiohttp.ClientSession, submit_bases: list[str], follow_bases: list[str], *,
                 name: str, max_tokens: int) -> None:
        self.http = http
        self.submit_bases = submit_bases
        self.follow_bases = follow_bases
        self.name = name
        self.max_tokens = max_tokens
        self.t0 = time.monotonic()
        self.calls: list[Call] = []
        self.tracked: dict[str, Tracked] = {}
        self.followers: list[asyncio.Task[None]] = []
        self.pending: set[asyncio.Task[Any]] = set()
        self.rng = random.Random(12)
        self.follow_from = 0  # index into follow_bases of the API streams go through (moves on when it is gone)
        self._n = 0
        self.quick = aiohttp.ClientTimeout(total=30)

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def submit_one(self) -> None:
        n = self._n
        self._n += 1
        body = {"prompt": f"drill {self.name} {n}", "max_tokens": self.rng.randint(20, self.max_tokens),
                "tenant": f"t{n % 3}"}
        session = f"drill-{self.name}-{n % 40}"
        order = self.submit_bases[n % len(self.submit_bases):] + self.submit_bases[:n % len(self.submit_bases)]
        for base in order:  # a refused connection stored nothing: try the next API
            started = self.now()
            try:
                async with self.http.post(f"{base}/v1/sessions/{session}/requests", json=body,
                                          timeout=self.quick) as response:
                    reply = await response.read()
                    call = Call("submit", started, self.now() - started, response.status,
                                "" if response.status == 202 else reply[:200].decode(errors="replace"),
                                "Retry-After" in response.headers,
                                response.status == 503 and "X-Request-Id" in response.headers
                                and response.headers.get("x-should-retry") == "false")
            except aiohttp.ClientConnectorError as error:
                self.calls.append(Call("submit", started, self.now() - started, 0, f"connect: {error}"))
                continue
            except (aiohttp.ClientError, TimeoutError) as error:
                call = Call("submit", started, self.now() - started, 0, f"{type(error).__name__}: {error}")
            self.calls.append(call)
            if call.status == 202:
                rid = json.loads(reply)["request_id"]
                tracked = self.tracked[rid] = Tracked(rid, body["max_tokens"], self.now())
                self.followers.append(asyncio.create_task(self.follow(tracked)))
            return

    async def run(self, requests: int, seconds: float, during: Callable[[], Awaitable[None]] | None = None) -> None:
        """`requests` submits spread evenly over `seconds` (each in a task of its own, so a hung call does not
        slow the rate), with `during()` (the fault) running alongside."""
        fault = asyncio.create_task(during()) if during is not None else None
        interval = seconds / max(1, requests)
        for i in range(requests):
            delay = self.t0 + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.submit_one())
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=60)
        if fault is not None:
            await fault

    async def probe(self, stop: asyncio.Event, every: float = 0.25) -> None:
        """GET /healthz and the status of a known request on every API, all along (response times, statuses)."""
        async def one(what: str, url: str) -> None:
            started = self.now()
            try:
                async with self.http.get(url, timeout=self.quick) as response:
                    await response.read()
                    self.calls.append(Call(what, started, self.now() - started, response.status, "",
                                           "Retry-After" in response.headers))
            except (aiohttp.ClientError, TimeoutError) as error:
                self.calls.append(Call(what, started, self.now() - started, 0, f"{type(error).__name__}: {error}"))

        tasks: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            for base in self.submit_bases:
                urls = [("healthz", f"{base}/healthz")]
                if self.tracked:
                    urls.append(("status", f"{base}/v1/requests/{next(iter(self.tracked))}"))
                for what, url in urls:
                    task = asyncio.create_task(one(what, url))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
        if tasks:
            await asyncio.wait(list(tasks), timeout=40)

    async def follow(self, t: Tracked) -> None:
        """Stream the request's events to its end: after a cut, resume from the last id seen (on the next API
        when the connection is refused); a 409 restarts from the first event; a 503 waits and tries again."""
        last_id: str | None = None
        cut_at: float | None = None
        opened = False  # a stream was open: a failure from here on is a cut to resume from
        while True:
            which = self.follow_from
            base = self.follow_bases[which % len(self.follow_bases)]
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with self.http.get(f"{base}/v1/requests/{t.rid}/events", headers=headers) as response:
                    if response.status == 409:
                        await response.read()
                        t.restarts += 1
                        if t.restarts > 20:  # the log cannot be read from its start either: give up
                            t.end = "409"
                            return
                        last_id, t.indices = None, []
                        continue
                    if response.status == 404:
                        t.missing = True
                        return
                    if response.status != 200:
                        await response.read()
                        await asyncio.sleep(0.2)
                        continue
                    opened = True
                    if cut_at is not None:
                        t.reopen_gaps.append(self.now() - cut_at)
                    async for event in sse_events(response):
                        if cut_at is not None:
                            t.event_gaps.append(self.now() - cut_at)
                            cut_at = None
                        last_id = event.id or last_id
                        if event.event == "token":
                            index = json.loads(event.data)["index"]
                            if index != len(t.indices):
                                t.live_anomalies += 1
                            t.indices.append(index)
                        elif event.event in ("started", "resumed"):
                            t.worker = json.loads(event.data).get("worker", "")
                            if event.event == "resumed":
                                t.resumed_at.append(self.now())
                        elif event.event in TERMINAL:
                            t.end = event.event
                            return
            except aiohttp.ClientConnectorError:
                if self.follow_from == which:  # that API is gone: every follower moves to the next one
                    self.follow_from += 1
            except (aiohttp.ClientError, TimeoutError):
                pass
            if cut_at is None and opened:
                cut_at = self.now()
                t.cuts += 1
            await asyncio.sleep(0.05)

    async def drain(self, seconds: float) -> int:
        """Wait for every follower to see its request end; returns how many did not in time (then cancelled)."""
        if not self.followers:
            return 0
        _, unfinished = await asyncio.wait(self.followers, timeout=seconds)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        return len(unfinished)

    async def replay(self, base: str, t: Tracked) -> None:
        """The request's whole log again, from its first event: token indices 0..n-1, each once, then done."""
        try:
            async with self.http.get(f"{base}/v1/requests/{t.rid}/events",
                                     timeout=aiohttp.ClientTimeout(total=30)) as response:
                if response.status == 404:
                    t.missing = True
                    return
                if response.status != 200:
                    t.replay = f"replay answered {response.status}: {(await response.read())[:120]!r}"
                    return
                indices, end = [], None
                async for event in sse_events(response):
                    if event.event == "token":
                        indices.append(json.loads(event.data)["index"])
                    elif event.event in TERMINAL:
                        end = event.event
                        break
        except (aiohttp.ClientError, TimeoutError) as error:
            t.replay = f"replay failed: {type(error).__name__}"
            return
        if end != "done":
            t.replay = f"replay ended {end!r}"
        elif indices != list(range(t.max_tokens)):
            doubled = len(indices) - len(set(indices))
            missing = len(set(range(t.max_tokens)) - set(indices))
            t.replay = f"token indices wrong: {len(indices)} tokens, {doubled} doubled, {missing} missing"

    async def replay_all(self, base: str) -> None:
        limit = asyncio.Semaphore(16)

        async def one(t: Tracked) -> None:
            async with limit:
                await self.replay(base, t)

        await asyncio.gather(*(one(t) for t in self.tracked.values()))

    # ---- figures -------------------------------------------------------------------------------------
    def verdict(self, *, allow_lost_before: float | None = None, live_must_be_clean: bool = True) -> dict[str, Any]:
        """Counts over the accepted requests and the calls; `problems` lists what fails the drill.
        `allow_lost_before`: a lost request accepted at or after this moment is allowed (everysec window)."""
        tracked = list(self.tracked.values())
        lost = [t for t in tracked if t.missing]
        allowed = [t for t in lost if allow_lost_before is not None and t.accepted_at >= allow_lost_before]
        wrong = [t for t in tracked if not t.missing and t.replay]
        unfinished = [t for t in tracked if not t.missing and t.end != "done" and not t.replay]
        anomalies = sum(t.live_anomalies for t in tracked if not t.missing)
        bad_5xx = [c for c in self.calls if c.status >= 500 and c.status != 503]
        other_4xx = [c for c in self.calls if 400 <= c.status < 500]
        no_retry_after = [c for c in self.calls if c.status == 503 and not c.retry_after and not c.maybe_stored]
        problems = []
        if len(lost) > len(allowed):
            problems.append(f"{len(lost) - len(allowed)} accepted requests lost")
        if wrong:
            problems.append(f"{len(wrong)} requests with a wrong replay, e.g. {wrong[0].rid}: {wrong[0].replay}")
        if unfinished:
            problems.append(f"{len(unfinished)} requests the live client never saw end `done`, e.g. "
                            f"{unfinished[0].rid}: {unfinished[0].end}")
        if anomalies and live_must_be_clean:
            problems.append(f"{anomalies} token indices out of order on live streams")
        if bad_5xx:
            problems.append(f"{len(bad_5xx)} answers 5xx other than 503, e.g. {bad_5xx[0].status} "
                            f"{bad_5xx[0].error[:120]}")
        if other_4xx:
            problems.append(f"{len(other_4xx)} unexpected 4xx, e.g. {other_4xx[0].status} {other_4xx[0].error[:120]}")
        if no_retry_after:
            problems.append(f"{len(no_retry_after)} 503 answers without Retry-After")
        submits = [c for c in self.calls if c.what == "submit"]
        return {
            "submitted": self._n,
            "accepted": len(tracked),
            "refused_503": sum(1 for c in submits if c.status == 503 and not c.maybe_stored),
            "maybe_stored_503": sum(1 for c in submits if c.maybe_stored),
            "connection_errors": sum(1 for c in submits if c.status == 0),
            "lost": len(lost), "lost_allowed": len(allowed),
            "completed": sum(1 for t in tracked if t.end == "done" and not t.replay and not t.missing),
            "replay_wrong": len(wrong), "unfinished": len(unfinished), "live_index_anomalies": anomalies,
            "resume_409_restarts": sum(t.restarts for t in tracked),
            "stream_cuts": sum(t.cuts for t in tracked),
            "tokens_checked": sum(t.max_tokens for t in tracked if not t.missing and not t.replay),
            "other_5xx": len(bad_5xx), "no_retry_after": len(no_retry_after),
            "problems": problems,
        }


async def worker_id_of(http: aiohttp.ClientSession, base: str, pid: int) -> str:
    """The id of the worker process `pid` (ids name no process; /v1/admin/stats shows each one's pid)."""
    async with http.get(f"{base}/v1/admin/stats") as response:
        workers = (await response.json()).get("workers") or []
    return next((w["worker_id"] for w in workers if w.get("pid") == pid), "")


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def in_thread(fn: Callable[[], Any]) -> Any:
    """A blocking step (kill, restart, wait for a process) off the client's loop: its streams keep reading."""
    return await asyncio.to_thread(fn)


async def finish(load: Load, stack: DrillStack, args: argparse.Namespace) -> None:
    """Every follower to the end, then a full replay of every accepted request through the last API."""
    await load.drain(args.drain_seconds)
    await load.replay_all(stack.bases[-1])


# ---- the drills -----------------------------------------------------------------------------------------


async def drill_valkey(stack: DrillStack, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    marks: dict[str, float] = {}
    async with client_session(256) as http:
        load = Load(http, stack.bases, stack.bases, name=f"valkey-{mode}", max_tokens=args.max_tokens)
        assert stack.server is not None
        server = stack.server

        async def fault() -> None:
            await asyncio.sleep(args.seconds * 0.4)
            await wait_for(lambda: any(t.indices for t in load.tracked.values()), 20, "tokens flowing")
            sizes: list[tuple[float, int]] = []  # (when, size of the AOF being appended to)
            if mode == "everysec" and args.everysec_loss_seconds > 0:
                until = time.monotonic() + args.everysec_loss_seconds + 0.5
                while time.monotonic() < until:
                    sizes.append((time.monotonic(), aof_tail(server.data_dir)[1]))
                    await asyncio.sleep(0.05)
            marks["kill"] = load.now()
            await in_thread(server.kill)
            if sizes:  # a power loss: what was written in the last second never reached the disk
                path, size = aof_tail(server.data_dir)
                cutoff = time.monotonic() - args.everysec_loss_seconds
                keep = max((n for when, n in sizes if when <= cutoff), default=size)
                with open(path, "r+b") as aof:
                    aof.truncate(keep)
                marks["aof_bytes_dropped"] = size - keep
            await asyncio.sleep(2.0)
            await in_thread(stack.restart_valkey)
            marks["restarted"] = load.now()
            progress(f"valkey-{mode}: killed at {marks['kill']:.1f} s, back at {marks['restarted']:.1f} s")

        await load.run(args.requests, args.seconds, fault)
        await finish(load, stack, args)
    figures = load.verdict(allow_lost_before=(marks["kill"] - EVERYSEC_WINDOW_S) if mode == "everysec" else None,
                           live_must_be_clean=mode == "always")
    outage = [c for c in load.calls if c.what == "submit" and marks["kill"] <= c.started <= marks["restarted"]]
    figures.update({"drill": f"valkey-{mode}", "killed_at_s": round(marks["kill"], 2),
                    "down_s": round(marks["restarted"] - marks["kill"], 2),
                    "aof_bytes_dropped": int(marks.get("aof_bytes_dropped", 0)),
                    "outage_submits": len(outage),
                    "outage_statuses": sorted({c.status for c in outage})})
    return figures


def aof_tail(data_dir: str) -> tuple[Path, int]:
    """The AOF file the server appends to (the newest incr file of its multi-part AOF) and its size."""
    files = sorted((Path(data_dir) / "appendonlydir").glob("*.incr.aof"),
                   key=lambda p: int(p.name.rsplit(".", 3)[-3]))
    return files[-1], files[-1].stat().st_size


async def drill_api(stack: DrillStack, args: argparse.Namespace) -> dict[str, Any]:
    marks: dict[str, float] = {}
    async with client_session(256) as http:
        # Streams start on API 0 (the victim) and move to API 1; submits go to both, the victim first.
        load = Load(http, stack.bases, stack.bases, name="api", max_tokens=args.max_tokens)

        async def fault() -> None:
            await asyncio.sleep(args.seconds * 0.4)
            await wait_for(lambda: sum(1 for t in load.tracked.values() if t.indices and t.end is None) >= 3, 20,
                           "streams in flight")
            marks["streaming"] = sum(1 for t in load.tracked.values() if t.end is None)
            marks["kill"] = load.now()
            await in_thread(stack.api_parts[0].kill)
            progress(f"api: killed API 0 at {marks['kill']:.1f} s with {marks['streaming']:.0f} streams open")

        await load.run(args.requests, args.seconds, fault)
        await finish(load, stack, args)
    figures = load.verdict()
    reopen = [g for t in load.tracked.values() for g in t.reopen_gaps]
    first = [g for t in load.tracked.values() for g in t.event_gaps]
    figures.update({"drill": "api", "killed_at_s": round(marks["kill"], 2),
                    "streams_open_at_kill": int(marks["streaming"]),
                    "streams_resumed": len(reopen),
                    "resume_gap_p50_s": round(percentile(reopen, 50), 4) if reopen else None,
                    "resume_gap_max_s": round(max(reopen), 4) if reopen else None,
                    "next_event_gap_p50_s": round(percentile(first, 50), 4) if first else None,
                    "next_event_gap_max_s": round(max(first), 4) if first else None})
    if marks["streaming"] and not reopen:
        figures["problems"].append("no stream was cut by the kill: the drill proved nothing")
    return figures


async def drill_blackhole(stack: DrillStack, args: argparse.Namespace) -> dict[str, Any]:
    marks: dict[str, float] = {}
    assert stack.blackhole is not None
    proxy = stack.blackhole
    seconds = max(args.seconds, args.blackhole_seconds + 6)
    async with client_session(256) as http:
        load = Load(http, stack.bases, stack.bases, name="blackhole", max_tokens=args.max_tokens)
        stop_probe = asyncio.Event()
        prober = asyncio.create_task(load.probe(stop_probe))

        async def fault() -> None:
            await asyncio.sleep(min(seconds * 0.25, 4.0))
            await wait_for(lambda: any(t.indices for t in load.tracked.values()), 20, "tokens flowing")
            marks["start"] = load.now()
            await in_thread(lambda: proxy.cut(True))
            progress(f"blackhole: Redis cut off at {marks['start']:.1f} s for {args.blackhole_seconds:g} s")
            await asyncio.sleep(args.blackhole_seconds)
            await in_thread(lambda: proxy.cut(False))
            marks["end"] = load.now()

        await load.run(int(args.requests * seconds / args.seconds), seconds, fault)
        stop_probe.set()
        await prober
        await finish(load, stack, args)
    figures = load.verdict()
    start, end = marks["start"], marks["end"]
    during = [c for c in load.calls if start <= c.started < end]
    slowest = max((c.seconds for c in during), default=0.0)
    after_ok = sorted(c.started + c.seconds for c in load.calls
                      if c.what == "submit" and c.status == 202 and c.started >= end)
    recovery = (after_ok[0] - end) if after_ok else None
    figures.update({"drill": "blackhole", "blackhole_s": round(end - start, 2),
                    "calls_during": len(during),
                    "statuses_during": {str(s): sum(1 for c in during if c.status == s)
                                        for s in sorted({c.status for c in during})},
                    "max_response_during_s": round(slowest, 3),
                    "p50_response_during_s": round(percentile([c.seconds for c in during], 50), 3) if during else None,
                    "recovery_s": round(recovery, 3) if recovery is not None else None})
    if slowest > args.max_hang_seconds:
        worst = max(during, key=lambda c: c.seconds)
        figures["problems"].append(f"an API call hung {slowest:.1f} s while Redis was black-holed (limit "
                                   f"{args.max_hang_seconds:g} s): {worst.what} -> {worst.status}")
    if recovery is None:
        figures["problems"].append("no submit was accepted after the blackhole lifted")
    return figures


async def drill_scheduler(stack: DrillStack, args: argparse.Namespace) -> dict[str, Any]:
    marks: dict[str, float] = {}
    counts: dict[str, int] = {}
    stranded: list[Tracked] = []  # running on the worker killed while no scheduler ran
    assert stack.scheduler is not None
    async with client_session(256) as http:
        load = Load(http, stack.bases, stack.bases, name="scheduler", max_tokens=args.max_tokens)

        def done_count() -> int:
            return sum(1 for t in load.tracked.values() if t.end == "done")

        async def fault() -> None:
            await asyncio.sleep(args.seconds * 0.3)
            await wait_for(lambda: any(t.indices for t in load.tracked.values()), 20, "tokens flowing")
            marks["kill"] = load.now()
            counts["done_at_kill"] = done_count()
            await in_thread(stack.scheduler.kill)  # type: ignore[union-attr]
            await asyncio.sleep(2.0)
            counts["done_without_scheduler"] = done_count() - counts["done_at_kill"]
            # now a worker dies too: its runs' leases lapse and nothing sweeps them until a scheduler returns
            victim = await worker_id_of(http, stack.bases[0], stack.workers[0].pid)
            marks["worker_kill"] = load.now()
            await in_thread(stack.workers[0].kill)
            stranded.extend(t for t in load.tracked.values() if t.end is None and t.worker == victim)
            await asyncio.sleep(4.0)  # past the lease (2.5 s by default): only a sweep would hand the runs back now
            counts["resumed_before_restart"] = sum(1 for t in stranded if t.resumed_at)
            counts["stalled_before_restart"] = sum(1 for t in load.tracked.values() if t.end is None)
            marks["restart"] = load.now()
            await in_thread(stack.scheduler.stop)  # type: ignore[union-attr]  # killed: this removes its log's temp dir
            stack.scheduler = await in_thread(stack.start_scheduler)
            progress(f"scheduler: killed at {marks['kill']:.1f} s, a worker at {marks['worker_kill']:.1f} s, "
                     f"scheduler back at {marks['restart']:.1f} s")

        await load.run(args.requests, max(args.seconds, 10.0), fault)
        await finish(load, stack, args)
    figures = load.verdict()
    ends = [t for t in load.tracked.values() if t.end == "done"]
    figures.update({"drill": "scheduler", "killed_at_s": round(marks["kill"], 2),
                    "completed_while_no_scheduler": counts["done_without_scheduler"],
                    "waiting_when_scheduler_restarted": counts["stalled_before_restart"],
                    "stranded_runs": len(stranded),
                    "stranded_resumed_before_restart": counts["resumed_before_restart"],
                    "restart_to_stranded_resumed_max_s": round(max(
                        (t.resumed_at[-1] - marks["restart"] for t in stranded if t.resumed_at), default=0.0), 2),
                    "restart_to_all_done_s": round(max(0.0, load.now() - marks["restart"]), 2) if ends else None})
    if not counts["done_without_scheduler"]:
        figures["problems"].append("no request completed while the scheduler was dead")
    return figures


async def _run_drill(name: str, stack: DrillStack, args: argparse.Namespace) -> dict[str, Any]:
    if name.startswith("valkey-"):
        return await drill_valkey(stack, args, name.removeprefix("valkey-"))
    runner = {"api": drill_api, "blackhole": drill_blackhole, "scheduler": drill_scheduler}[name]
    return await runner(stack, args)


def stack_for(name: str, args: argparse.Namespace) -> DrillStack:
    return DrillStack(apis=2 if name == "api" else 1, appendfsync="everysec" if name == "valkey-everysec" else "always",
                      proxy=name == "blackhole", tokens_per_second=args.tokens_per_second)


def run_drill(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One drill on a fresh stack; its figures, with `problems` empty when it passed."""
    progress(f"drill {name}: starting the stack")
    stack = stack_for(name, args)
    started = time.monotonic()
    try:
        stack.start()
        figures = asyncio.run(_run_drill(name, stack, args))
    except Exception as error:  # a drill that could not run is a failed drill, with the logs to say why
        figures = {"drill": name, "problems": [f"{type(error).__name__}: {error}"]}
    if figures["problems"]:
        figures["logs"] = stack.log_tails()
    stack.stop()
    figures["seconds"] = round(time.monotonic() - started, 1)
    progress(f"drill {name}: {'ok' if not figures['problems'] else 'FAILED: ' + '; '.join(figures['problems'])}")
    return figures


def drill_names(which: str) -> list[str]:
    names = ["valkey-always", "valkey-everysec", "api", "blackhole", "scheduler"]
    if which == "all":
        return names
    return [n for n in names if n == which or n.startswith(which + "-")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [run_drill(name, args) for name in drill_names(args.drill)]
    print("\nFault drills (each on its own stack: Valkey, API, scheduler, 2 sim workers)")
    print_table([{k: r.get(k, "") for k in ("drill", "accepted", "refused_503", "connection_errors", "lost",
                                             "completed", "replay_wrong", "live_index_anomalies",
                                             "resume_409_restarts", "stream_cuts", "seconds")} for r in rows])
    details = {
        "valkey-always": ("down_s", "outage_submits", "outage_statuses"),
        "valkey-everysec": ("down_s", "aof_bytes_dropped", "outage_submits", "outage_statuses", "lost_allowed",
                            "live_index_anomalies"),
        "api": ("streams_open_at_kill", "streams_resumed", "resume_gap_p50_s", "resume_gap_max_s",
                "next_event_gap_p50_s", "next_event_gap_max_s"),
        "blackhole": ("blackhole_s", "calls_during", "statuses_during", "max_response_during_s",
                      "p50_response_during_s", "recovery_s"),
        "scheduler": ("completed_while_no_scheduler", "waiting_when_scheduler_restarted", "stranded_runs",
                      "stranded_resumed_before_restart", "restart_to_stranded_resumed_max_s", "restart_to_all_done_s"),
    }
    for row in rows:
        shown = ", ".join(f"{k} {row[k]}" for k in details.get(row["drill"], ()) if k in row)
        print(f"  {row['drill']}: {shown}" + (f"\n    FAILED: {'; '.join(row['problems'])}" if row["problems"] else ""))
    failed = [r["drill"] for r in rows if r["problems"]]
    tail = f"; failed: {', '.join(failed)}" if failed else ""
    print(f"\n{len(rows) - len(failed)} of {len(rows)} drills passed{tail}")
    result = {"drills": rows, "passed": not failed,
              "settings": {k: getattr(args, k) for k in ("drill", "requests", "seconds", "tokens_per_second",
                                                         "max_tokens", "blackhole_seconds", "max_hang_seconds",
                                                         "everysec_loss_seconds")}}
    write_result("drills", result)
    for row in rows:
        if row["problems"] and row.get("logs"):
            print(f"\n{row['drill']} logs:\n{row['logs']}")
    if failed:
        raise SystemExit(1)
    return result
