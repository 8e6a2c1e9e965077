"""Open streams on one API process: N concurrent SSE streams, the API's Redis connections and its memory.

Target (../shared/DESIGN.md): 10,000 open streams on one API process over <= 64 Redis connections.
Starts its own parts: a Valkey server, one `sluicegate api` (the one measured), a scheduler and
workers running the sim. Then, in `--client-processes` client processes (one asyncio loop holding
10,000 sockets spends its time in the loop, not in the server):
1. submit one 1-token request into each of N sessions and wait until they are done;
2. open GET /v1/sessions/{sid}/events from the start of each of the N sessions, all at once: each
   stream's first read is the session's backlog (the burst that used to take a Redis connection each);
   a stream counts as open once its backlog's `done` arrived;
3. with all N open, submit a second request into each session; every stream must get its live
   `queued`, `started`, token and `done` events.
Measured by the parent: the API's Redis connections (CLIENT LIST, by the client name the API gives
them: `sluicegate-api:<pid>`), sampled every 50 ms from before the streams open to the end (the
maximum is the figure), the API's RSS with the N streams open, and how long the opening took.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import queue
import resource
import time
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import aiohttp
import redis

from sluicegate.loadtest.common import (
    Component,
    cpu_by_role,
    cpu_delta,
    free_port,
    print_table,
    process_cpu,
    progress,
    scratch_server,
    wait_http,
    write_result,
)
from sluicegate.loadtest.targets import OPEN_STREAMS as TARGET_STREAMS
from sluicegate.loadtest.targets import STREAM_REDIS_CONNECTIONS as TARGET_CONNECTIONS

DONE = b"event: done\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", type=int, default=TARGET_STREAMS, help="concurrent SSE streams")
    parser.add_argument("--client-processes", type=int, default=4, help="client processes sharing the streams")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--slots", type=int, default=64, help="slots per worker")
    parser.add_argument("--submitters", type=int, default=32, help="concurrent submits per client process")
    parser.add_argument("--opening", type=int, default=256,
                        help="streams each client process has asked for and not yet got headers of (0: all at once; "
                             "a stream whose response has not started in 5 s is a 503, api/deadline.py)")
    parser.add_argument("--api-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for `sluicegate api` (repeat), e.g. --api-flag=--redis-max-connections=32")


def raise_nofile() -> int:
    """Lift this process's open-file limit to its hard limit (each stream is a socket); returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def submit_all(http: aiohttp.ClientSession, base: str, sids: list[str], concurrency: int) -> list[str]:
    """One 1-token request into each session; returns the failures."""
    todo = iter(sids)
    failures: list[str] = []

    async def submitter() -> None:
        for sid in todo:
            async with http.post(f"{base}/v1/sessions/{sid}/requests",
                                 json={"prompt": "streams bench", "max_tokens": 1}) as response:
                if response.status != 202:
                    failures.append(f"submit {sid}: {response.status} {await response.text()}")

    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return failures


async def client_main(base: str, sids: list[str], submitters: int, opening: int, opened: Any, go: Any,
                      report: Any) -> None:
    failures: list[str] = []
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=300))
    async with http:
        failures += await submit_all(http, base, sids, submitters)
        opened.put(("ready", len(sids)))
        await asyncio.to_thread(go.wait)
        dones = {sid: 0 for sid in sids}
        open_events = {sid: asyncio.Event() for sid in sids}

        gate = asyncio.Semaphore(opening or len(sids))

        async def follow(sid: str) -> None:
            tail = b""
            try:
                async with gate:  # held until the headers arrive: the stream is open on the server then
                    response = await http.get(f"{base}/v1/sessions/{sid}/events")
                async with response:
                    if response.status != 200:
                        failures.append(f"stream {sid}: {response.status}")
                        open_events[sid].set()
                        return
                    async for chunk in response.content.iter_any():
                        window = tail + chunk
                        dones[sid] += window.count(DONE)
                        tail = window[-(len(DONE) - 1):]
                        if dones[sid] >= 1:
                            open_events[sid].set()
                        if dones[sid] >= 2:
                            return
            except Exception as error:  # reported, not raised
                failures.append(f"stream {sid}: {type(error).__name__}: {error}")
                open_events[sid].set()

        began = time.perf_counter()
        tasks = [asyncio.create_task(follow(sid)) for sid in sids]
        await asyncio.gather(*(e.wait() for e in open_events.values()))
        opened.put(("open", time.perf_counter() - began))
        await asyncio.to_thread(go.wait)  # the parent's second go: every client's streams are open
        # A fresh client for the second submits: the first ones' keep-alive connections sat idle past the
        # server's keep-alive timeout while the streams opened, and reusing one would race its close.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as fresh:
            failures += await submit_all(fresh, base, sids, submitters)
        await asyncio.wait(tasks, timeout=120)
        for task in tasks:
            task.cancel()
    whole = sum(1 for n in dones.values() if n >= 2)
    report.put({"streams": len(sids), "whole": whole, "failures": failures[:20], "failed": len(failures)})


def client_process(base: str, sids: list[str], submitters: int, opening: int, opened: Any, go: MpEvent,
                   go2: MpEvent, report: Any) -> None:
    raise_nofile()
    asyncio.run(client_main(base, sids, submitters, opening, opened, _Both(go, go2), report))


class _Both:
    """The client waits twice: for the parent's first `go` (open the streams), then for its second."""

    def __init__(self, first: MpEvent, second: MpEvent) -> None:
        self.events = [first, second]

    def wait(self) -> None:
        self.events.pop(0).wait()


def api_connections(client: redis.Redis) -> int:
    return sum(1 for c in client.client_list() if str(c.get("name", "")).startswith("sluicegate-api:"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    limit = raise_nofile()  # the API inherits it
    if limit < args.streams + 1000:
        raise SystemExit(f"the open-file hard limit is {limit}: too low for {args.streams} streams")
    server = scratch_server()
    port = free_port()
    common = ["--redis-url", server.url]
    api = Component("api", [*common, "--port", str(port), *args.api_flag])
    parts = [api, Component("scheduler", common)] + [
        Component("worker", [*common, "--slots", str(args.slots), "--sim-prefill-ms", "0",
                             "--sim-tokens-per-second", "1000"]) for _ in range(args.workers)]
    admin = redis.Redis.from_url(server.url, decode_responses=True)
    ctx = mp.get_context("spawn")
    opened, report = ctx.Queue(), ctx.Queue()
    go, go2 = ctx.Event(), ctx.Event()
    clients: list[Any] = []
    samples: list[tuple[float, int]] = []
    try:
        for part in parts:
            part.start()
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process=api.process)
        roots = [p.pid for p in parts] + ([server.process.pid] if server.process else [])
        sids = [f"st-{i}" for i in range(args.streams)]
        k = max(1, args.client_processes)
        for c in range(k):
            proc = ctx.Process(target=client_process, args=(base, sids[c::k], args.submitters, args.opening, opened,
                                                            go, go2, report))
            proc.start()
            clients.append(proc)
        progress(f"{k} client processes: one request into each of {args.streams} sessions")
        for _ in clients:
            opened.get(timeout=600)
        time.sleep(2)  # the first requests end (1 token each): the streams then open on their backlog
        rss_before, idle_connections = rss_bytes(api.pid), api_connections(admin)
        cpu0, api_cpu0 = cpu_by_role(roots), process_cpu(api.pid)
        progress(f"opening {args.streams} streams at once")
        began = time.perf_counter()
        go.set()
        open_times = []
        while len(open_times) < k:
            samples.append((time.perf_counter() - began, api_connections(admin)))
            with contextlib.suppress(queue.Empty):  # sample again
                open_times.append(opened.get(timeout=0.05)[1])
        opened_in = time.perf_counter() - began
        rss_open = rss_bytes(api.pid)
        with_streams = api_connections(admin)
        progress(f"all open in {opened_in:.1f} s; API {with_streams} Redis connections, RSS {rss_open / 2**20:.0f} MiB;"
                 " a second request into each session")
        go2.set()
        reports = []
        while len(reports) < k:
            samples.append((time.perf_counter() - began, api_connections(admin)))
            with contextlib.suppress(queue.Empty):
                reports.append(report.get(timeout=0.05))
        ended = time.perf_counter() - began
        cpu = cpu_delta(cpu0, cpu_by_role(roots))
        api_cpu = process_cpu(api.pid) - api_cpu0
        for proc in clients:
            proc.join(30)
    finally:
        for proc in clients:
            if proc.is_alive():
                proc.kill()
        admin.close()
        for part in parts:
            part.stop()
        server.stop()
    peak = max((n for _, n in samples), default=0)
    whole = sum(r["whole"] for r in reports)
    failed = sum(r["failed"] for r in reports)
    problems = [p for r in reports for p in r["failures"]][:20]
    rows = [{"streams": args.streams, "opened_in_s": opened_in, "api_redis_conns_idle": idle_connections,
             "api_redis_conns_peak": peak, "api_redis_conns_open": with_streams,
             "api_rss_mib_before": rss_before / 2**20, "api_rss_mib_open": rss_open / 2**20,
             "api_kib_per_stream": (rss_open - rss_before) / 1024 / max(1, args.streams),
             "streams_whole": whole, "failures": failed, "api_cpu_s": api_cpu, "seconds": ended}]
    print(f"\n{args.streams} SSE streams on one API process ({k} client processes, each opening "
          f"{args.opening or 'all'} at a time)")
    print_table(rows)
    print("\nCPU seconds from opening the streams to the end, by process role:")
    print_table([{"role": r, "cpu_s": s} for r, s in cpu.items() if s > 0])
    for line in problems[:5]:
        print("problem:", line)
    met = peak <= TARGET_CONNECTIONS and whole == args.streams and args.streams >= TARGET_STREAMS
    print(f"\npeak {peak} API Redis connections for {args.streams} streams, {whole} streams whole: target "
          f"{TARGET_STREAMS:,} streams on <= {TARGET_CONNECTIONS} ({'met' if met else 'MISSED'})")
    result = {"rows": rows, "peak_connections": peak, "streams_whole": whole, "target_met": met,
              "connection_samples": [(round(t, 2), n) for t, n in samples[:: max(1, len(samples) // 200)]],
              "cpu_seconds": cpu, "problems": problems, "settings": vars(args)}
    write_result("streams", result)
    return result
