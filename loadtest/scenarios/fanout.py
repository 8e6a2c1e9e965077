"""Token fan-out: tokens/s streamed to SSE clients from ONE API process (target >= 50k tokens/s).

Starts its own parts: a Valkey server, `sluicegate api` (one process: the one measured), a
scheduler and N workers running a fast sim. Many clients each loop: submit a request into its own
session, stream GET /v1/requests/{id}/events to the end, check that exactly max_tokens token events
arrived, repeat. Counted: token events received by the clients per second in the measured window,
beside the CPU seconds of the API process (and of every other part) in that window.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp

from sluicegate.loadtest.common import (
    Component,
    client_session,
    cpu_by_role,
    cpu_delta,
    cpu_seconds,
    free_port,
    print_table,
    process_cpu,
    progress,
    scratch_server,
    wait_http,
    write_result,
)
from sluicegate.loadtest.targets import FANOUT_TOKENS_PER_S

TOKEN = b"event: token\n"
TERMINAL = (b"event: done\n", b"event: error\n", b"event: cancelled\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", type=int, default=100, help="concurrent SSE clients")
    parser.add_argument("--max-tokens", type=int, default=2000, help="tokens per request")
    parser.add_argument("--tokens-per-second", type=float, default=2000.0,
                        help="sim pace per request (0 = unpaced); a slow pace (e.g. 100) sends one token per "
                             "message and makes the workers' per-token appends the limit")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--slots", type=int, default=0, help="slots per worker (0 = enough for every stream)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring")
    parser.add_argument("--no-aof", action="store_true", help="run the Valkey server without AOF")


class Counter:
    def __init__(self) -> None:
        self.tokens = 0
        self.requests = 0
        self.short: list[str] = []
        self.errors: list[str] = []


async def stream_request(http: aiohttp.ClientSession, base: str, sid: str, max_tokens: int, counter: Counter) -> None:
    async with http.post(f"{base}/v1/sessions/{sid}/requests",
                         json={"prompt": f"fanout {sid}", "max_tokens": max_tokens}) as response:
        if response.status != 202:
            raise RuntimeError(f"submit: {response.status} {await response.text()}")
        rid = (await response.json())["request_id"]
    got, tail, ended = 0, b"", False
    async with http.get(f"{base}/v1/requests/{rid}/events") as response:
        # Count token events straight from the bytes: parsing every event would cost the client more CPU
        # than the server spends sending it. `tail` keeps a marker split across two chunks countable once.
        async for chunk in response.content.iter_any():
            window = tail + chunk
            n = window.count(TOKEN)
            got += n
            counter.tokens += n
            ended = ended or any(marker in window for marker in TERMINAL)
            tail = window[-(len(TOKEN) - 1):]
    counter.requests += 1
    if got != max_tokens or not ended:
        counter.short.append(f"{rid}: {got} tokens, ended={ended}")


async def measure(api: Component, roots: list[int], base: str, args: argparse.Namespace) -> dict[str, Any]:
    counter = Counter()
    stop = asyncio.Event()

    async def client(http: aiohttp.ClientSession, c: int) -> None:
        while not stop.is_set():
            try:
                await stream_request(http, base, f"fan-{c}", args.max_tokens, counter)
            except Exception as error:  # reported, not raised
                counter.errors.append(f"{type(error).__name__}: {error}")
                await asyncio.sleep(0.1)

    async with client_session(args.streams * 2) as http:
        tasks = []
        for c in range(args.streams):  # stagger the starts so requests do not all end together
            tasks.append(asyncio.create_task(client(http, c)))
            await asyncio.sleep(args.warmup / 2 / args.streams)
        progress(f"{args.streams} streams up; warm-up")
        await asyncio.sleep(args.warmup / 2)
        t0, tokens0, api0, client0, all0 = (time.perf_counter(), counter.tokens, process_cpu(api.pid),
                                            cpu_seconds(), cpu_by_role(roots))
        ticks = max(1, int(args.duration // 5))
        for k in range(ticks):
            await asyncio.sleep(args.duration / ticks)
            rate = (counter.tokens - tokens0) / (time.perf_counter() - t0)
            progress(f"{(k + 1) * args.duration / ticks:.0f}/{args.duration:g} s: {rate:,.0f} tokens/s")
        t1, tokens1, api1, client1, all1 = (time.perf_counter(), counter.tokens, process_cpu(api.pid),
                                            cpu_seconds(), cpu_by_role(roots))
        stop.set()
        for task in tasks:  # generation goes on without them: nothing to wait for
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"seconds": t1 - t0, "tokens": tokens1 - tokens0, "api_cpu": api1 - api0, "client_cpu": client1 - client0,
            "cpu": cpu_delta(all0, all1), "requests": counter.requests, "short": counter.short,
            "errors": counter.errors}


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = scratch_server(persistent=not args.no_aof)
    slots = args.slots or -(-args.streams // args.workers) + 1
    port = free_port()
    common = ["--redis-url", server.url]
    api = Component("api", [*common, "--port", str(port)])
    parts = [api, Component("scheduler", common)] + [
        Component("worker", [*common, "--slots", str(slots), "--sim-prefill-ms", "0",
                             "--sim-tokens-per-second", str(args.tokens_per_second)]) for _ in range(args.workers)]
    try:
        for part in parts:
            part.start()
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process=api.process)
        roots = [p.pid for p in parts] + ([server.process.pid] if server.process else [])
        out = asyncio.run(measure(api, roots, base, args))
    finally:
        for part in parts:
            part.stop()
        server.stop()
    rate = out["tokens"] / out["seconds"]
    api_cores = out["api_cpu"] / out["seconds"]
    us_per_token = 1e6 * out["api_cpu"] / max(1, out["tokens"])
    rows = [{"streams": args.streams, "tokens_per_s": rate, "api_cpu_s": out["api_cpu"], "api_cores": api_cores,
             "api_us_per_token": us_per_token, "api_tokens_per_core_s": 1e6 / us_per_token if us_per_token else 0,
             "client_cpu_s": out["client_cpu"],
             "requests_done": out["requests"], "short_streams": len(out["short"]), "errors": len(out["errors"])}]
    print(f"\nSSE fan-out from one API process: {args.streams} streams, {args.max_tokens} tokens per request at "
          f"{args.tokens_per_second:g} tokens/s each, {args.workers} workers x {slots} slots, {out['seconds']:.1f} s")
    print_table(rows)
    print("\nCPU seconds in the window by process role:")
    print_table([{"role": r, "cpu_s": s, "cores": s / out["seconds"]} for r, s in out["cpu"].items() if s > 0])
    for line in (out["short"] + out["errors"])[:5]:
        print("problem:", line)
    met = rate >= FANOUT_TOKENS_PER_S and not out["short"] and not out["errors"]  # a lost token is no rate
    print(f"\n{rate:,.0f} tokens/s to SSE clients, {len(out['short'])} streams short or long, "
          f"{len(out['errors'])} errors: target >= {FANOUT_TOKENS_PER_S:,} with every stream whole "
          f"({'met' if met else 'MISSED'})")
    result = {"rows": rows, "tokens_per_second": round(rate), "target": FANOUT_TOKENS_PER_S, "target_met": met,
              "cpu_seconds": out["cpu"], "problems": (out["short"] + out["errors"])[:20],
              "settings": {**vars(args), "slots": slots}}
    write_result("fanout", result)
    return result
