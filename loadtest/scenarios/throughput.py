"""End-to-end throughput: completed 1-token requests per second with 64 concurrent clients.

Against `sluicegate serve` (sim engine, prefill 0). Each client loops: submit a request into its own
session, stream the request's events until `done`, repeat. Counted: requests that completed inside
the measured window (after a warm-up). Reported beside the rate: latency (submit to `done`), the
client's own CPU seconds (aiohttp, in this process) and the CPU seconds of every server process, by
role, so the bottleneck is visible. Target >= 300 req/s on 2 cores (issue 4), aim 500.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
import orjson

from sluicegate.loadtest.common import (
    ServeProcess,
    client_session,
    cpu_by_role,
    cpu_delta,
    cpu_seconds,
    percentile,
    print_table,
    progress,
    write_result,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens per request")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--slots", type=int, default=32, help="slots per worker")
    parser.add_argument("--mode", choices=("sse", "chat"), default="sse",
                        help="sse: POST submit + GET request events; chat: POST /v1/chat/completions stream")
    parser.add_argument("--session-per-request", action="store_true",
                        help="a new session for every request (default: one session per client)")
    parser.add_argument("--serve-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for `sluicegate serve` (repeat), e.g. --serve-flag=--appendfsync=always")


async def one_sse(http: aiohttp.ClientSession, base: str, sid: str, max_tokens: int) -> int:
    async with http.post(f"{base}/v1/sessions/{sid}/requests",
                         json={"prompt": "throughput bench", "max_tokens": max_tokens}) as response:
        if response.status != 202:
            raise RuntimeError(f"submit: {response.status} {await response.text()}")
        rid = (await response.json())["request_id"]
    # The request stream closes after its terminal event: read it whole and count in the bytes (parsing
    # each event in Python would cost the client, which shares the cores, more than the check is worth).
    async with http.get(f"{base}/v1/requests/{rid}/events") as response:
        body = await response.read()
    if b"\nevent: done\n" not in b"\n" + body:
        raise RuntimeError(f"stream ended without done: {body[-200:]!r}")
    return body.count(b"event: token\n")


async def one_chat(http: aiohttp.ClientSession, base: str, sid: str, max_tokens: int) -> int:
    body = {"stream": True, "max_tokens": max_tokens,  # no model: the group `default`
            "messages": [{"role": "user", "content": "throughput bench"}]}
    async with http.post(f"{base}/v1/chat/completions", json=body, headers={"X-Session-Id": sid}) as response:
        if response.status != 200:
            raise RuntimeError(f"chat: {response.status} {await response.text()}")
        data = await response.read()
    tokens, done = 0, False
    for line in data.split(b"\n"):
        if line == b"data: [DONE]":
            done = True
        elif line.startswith(b"data: {"):
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"chat stream error: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                tokens += 1
    if not done:
        raise RuntimeError(f"chat stream ended without [DONE]: {data[-200:]!r}")
    return tokens


async def measure(serve: ServeProcess, args: argparse.Namespace) -> dict[str, Any]:
    base = serve.base_url
    finished: list[tuple[float, float]] = []  # (end time, latency seconds)
    errors: list[str] = []
    stop = asyncio.Event()
    one = one_sse if args.mode == "sse" else one_chat

    async def client(http: aiohttp.ClientSession, c: int) -> None:
        n = 0
        while not stop.is_set():
            sid = f"tp-{c}-{n}" if args.session_per_request else f"tp-{c}"
            n += 1
            began = time.perf_counter()
            try:
                tokens = await one(http, base, sid, args.max_tokens)
                if tokens != args.max_tokens:
                    raise RuntimeError(f"{tokens} tokens, expected {args.max_tokens}")
            except Exception as error:  # a failed request is a reported failure, not a crash
                errors.append(f"{type(error).__name__}: {error}")
                await asyncio.sleep(0.05)
                continue
            ended = time.perf_counter()
            finished.append((ended, ended - began))

    async with client_session(args.clients * 2) as http:
        tasks = [asyncio.create_task(client(http, c)) for c in range(args.clients)]
        progress(f"{args.clients} clients, warm-up {args.warmup:g} s")
        await asyncio.sleep(args.warmup)
        roots = [serve.process.pid]  # type: ignore[union-attr]
        t0, client0, server0 = time.perf_counter(), cpu_seconds(), cpu_by_role(roots)
        ticks = max(1, int(args.duration // 5))
        for k in range(ticks):
            await asyncio.sleep(args.duration / ticks)
            done = sum(1 for end, _ in finished if end >= t0)
            progress(f"{(k + 1) * args.duration / ticks:.0f}/{args.duration:g} s: {done} completed, "
                     f"{len(errors)} errors")
        t1, client1, server1 = time.perf_counter(), cpu_seconds(), cpu_by_role(roots)
        stop.set()
        await asyncio.wait(tasks, timeout=30)
    window = [lat for end, lat in finished if t0 <= end <= t1]
    return {"completed": len(window), "seconds": t1 - t0, "latencies": window, "errors": errors,
            "client_cpu": client1 - client0, "server_cpu": cpu_delta(server0, server1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--workers", str(args.workers), "--slots", str(args.slots), "--sim-prefill-ms", "0",
             "--sim-tokens-per-second", "1000", *args.serve_flag]
    serve = ServeProcess(flags=flags).start()
    try:
        out = asyncio.run(measure(serve, args))
    finally:
        serve.stop()
    rate = out["completed"] / out["seconds"]
    ms = [x * 1000 for x in out["latencies"]]
    cpu = out["server_cpu"]
    rows = [{"clients": args.clients, "mode": args.mode, "completed": out["completed"],
             "req_per_s": rate, "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
             "errors": len(out["errors"]), "client_cpu_s": out["client_cpu"],
             "client_cpu_ms_per_req": 1000 * out["client_cpu"] / max(1, out["completed"])}]
    print(f"\n{args.max_tokens}-token requests end to end over {out['seconds']:.1f} s "
          f"({args.workers} workers x {args.slots} slots)")
    print_table(rows)
    print("\nserver CPU seconds in the window, by process role (cores = seconds / window):")
    print_table([{"role": role, "cpu_s": s, "cores": s / out["seconds"],
                  "cpu_ms_per_req": 1000 * s / max(1, out["completed"])} for role, s in cpu.items() if s > 0])
    if out["errors"]:
        print(f"first errors: {out['errors'][:3]}")
    print(f"\n{rate:.0f} completed requests/s: target >= 300 ({'met' if rate >= 300 else 'MISSED'}), "
          f"aim 500 ({'met' if rate >= 500 else 'not yet'})")
    result = {"rows": rows, "req_per_s": round(rate, 1), "target": 300, "aim": 500, "target_met": rate >= 300,
              "aim_met": rate >= 500, "server_cpu_seconds": cpu, "errors": out["errors"][:20],
              "settings": {**{k: v for k, v in vars(args).items() if k != "func"}, "serve_flags": flags}}
    write_result("throughput", result)
    return result
