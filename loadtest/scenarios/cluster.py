"""cluster: the whole stack on an embedded 3-master Valkey Cluster, and how the load spreads over the masters.

Starts its own parts: an embedded cluster (no persistence, in a temp dir), `sluicegate api`, a
scheduler and N workers running a fast sim engine, all with `--redis-url <seed> --redis-cluster`.
Many clients each take sessions from a shared list: submit a request (16-64 tokens) into the session,
stream GET /v1/requests/{id}/events to the end, and check that the token indices are exactly
0..max_tokens-1, in order, followed by `done`. Reported:

- completed requests/s and tokens/s over the run (with the client's CPU beside them);
- the share of keys per master (DBSIZE after the run): each must hold 15-45% (a check of this
  bench's own, printed and stored as a check, not a DESIGN target);
- the share of token appends per master: the tokens written into the data-plane buckets a master
  owns, from the metrics hashes `sg:{s:BB}:m` (field `tokens|group|priority|tenant`, before/after);
  none may be above 45% (README, "Growing past one Redis"; DESIGN's target for 3 masters: another
  `--masters` prints the shares with no verdict);
- per master, its Redis CPU (INFO CPU used_cpu_sys + used_cpu_user, before/after) and its FCALLs
  (INFO commandstats, before/after): the control plane of a group lives on one master, so its FCALL
  count is higher than its share of the tokens;
- the CPU seconds of every process by role.

Exits non-zero when a key share is outside 15-45%, an append share is above 45% (3 masters), or any
stream missed, repeated or reordered a token index (or failed).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis

from sluicegate.embedded import EmbeddedCluster
from sluicegate.loadtest.common import (
    Component,
    client_session,
    cpu_by_role,
    cpu_delta,
    cpu_seconds,
    free_port,
    percentile,
    print_table,
    progress,
    wait_http,
    write_result,
)
from sluicegate.loadtest.targets import CLUSTER_MASTERS, verdict_word
from sluicegate.loadtest.targets import CLUSTER_MAX_APPEND_SHARE as MAX_APPEND_SHARE
from sluicegate.sessions import keys
from sluicegate.sessions.connect import key_slot, sync_client

KEY_SHARE = (0.15, 0.45)  # each master's share of the keys: a check of this bench's own, not a DESIGN target
TOKEN_INDEX = re.compile(rb'event: token\r?\ndata: \{"request_id":"[^"]*","index":(\d+)[,}]')
TOKEN = b"event: token\n"
DONE = re.compile(rb"event: done\r?\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=2000, help="sessions driven (one request each by default)")
    parser.add_argument("--requests-per-session", type=int, default=1, help="requests per session, one after another")
    parser.add_argument("--min-tokens", type=int, default=16, help="fewest tokens per request")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens per request")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (each streams one request)")
    parser.add_argument("--masters", type=int, default=3, help="masters of the embedded cluster")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--slots", type=int, default=0, help="slots per worker (0 = enough for every client)")
    parser.add_argument("--tokens-per-second", type=float, default=2000.0, help="sim pace per request")
    parser.add_argument("--timeout", type=float, default=100.0, help="give up driving after this many seconds")
    parser.add_argument("--seed", type=int, default=11)


# ---- the clients ---------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    bad_streams: list[str] = field(default_factory=list)  # missed, repeated or reordered indices; no `done`
    errors: list[str] = field(default_factory=list)


def check_stream(body: bytes, max_tokens: int) -> str | None:
    """None when the stream carried token indices 0..max_tokens-1 exactly once, in order, then `done`;
    otherwise what was wrong."""
    indices = [int(i) for i in TOKEN_INDEX.findall(body)]
    if len(indices) != body.count(TOKEN):
        return f"{body.count(TOKEN)} token events but {len(indices)} parsed"
    if indices != list(range(max_tokens)):
        missing = sorted(set(range(max_tokens)) - set(indices))
        return f"indices {indices[:8]}... ({len(indices)} of {max_tokens}; missing {missing[:8]})"
    if not DONE.search(body):
        return f"no `done` after {len(indices)} tokens: {body[-120:]!r}"
    return None


async def one_request(http: aiohttp.ClientSession, base: str, sid: str, max_tokens: int, tally: Tally) -> None:
    began = time.perf_counter()
    async with http.post(f"{base}/v1/sessions/{sid}/requests",
                         json={"prompt": f"cluster bench {sid}", "max_tokens": max_tokens}) as response:
        if response.status != 202:
            raise RuntimeError(f"submit: {response.status} {await response.text()}")
        rid = (await response.json())["request_id"]
    async with http.get(f"{base}/v1/requests/{rid}/events") as response:
        if response.status != 200:
            raise RuntimeError(f"events: {response.status} {await response.text()}")
        body = await response.read()
    problem = check_stream(body, max_tokens)
    if problem:
        tally.bad_streams.append(f"{rid} ({sid}): {problem}")
        return
    tally.requests += 1
    tally.tokens += max_tokens
    tally.latencies.append(time.perf_counter() - began)


async def drive(base: str, args: argparse.Namespace, tally: Tally) -> float:
    """Every session's requests through `args.clients` clients; returns the seconds it took."""
    rng = random.Random(args.seed)
    tag = f"{rng.getrandbits(32):08x}"  # new session ids on every run
    work: asyncio.Queue[tuple[str, list[int]]] = asyncio.Queue()
    for i in range(args.sessions):
        work.put_nowait((f"cl-{tag}-{i}", [rng.randint(args.min_tokens, args.max_tokens)
                                           for _ in range(args.requests_per_session)]))

    async def client(http: aiohttp.ClientSession) -> None:
        while not work.empty():
            sid, sizes = work.get_nowait()
            for size in sizes:
                try:
                    await one_request(http, base, sid, size, tally)
                except Exception as error:  # a failed request is a reported failure, not a crash
                    tally.errors.append(f"{sid}: {type(error).__name__}: {error}")

    began = time.perf_counter()
    async with client_session(args.clients * 2) as http:
        tasks = [asyncio.create_task(client(http)) for _ in range(args.clients)]
        total = args.sessions * args.requests_per_session
        deadline = began + args.timeout
        while not all(task.done() for task in tasks):
            await asyncio.wait(tasks, timeout=5)
            done = tally.requests + len(tally.bad_streams) + len(tally.errors)
            progress(f"{time.perf_counter() - began:.0f} s: {done}/{total} requests ended, {tally.tokens:,} tokens, "
                     f"{len(tally.bad_streams)} bad streams, {len(tally.errors)} errors")
            if time.perf_counter() > deadline:
                tally.errors.append(f"gave up after {args.timeout:g} s with {total - done} requests left")
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                break
    return time.perf_counter() - began


# ---- reading the masters -------------------------------------------------------------------------


@dataclass
class Master:
    index: int
    port: int
    client: redis.Redis
    buckets: list[str]


def masters_of(cluster: EmbeddedCluster) -> list[Master]:
    """The cluster's masters, each with the data-plane buckets whose slot it serves (from CLUSTER SLOTS)."""
    clients = {port: redis.Redis(host=cluster.host, port=port, password=cluster.password, socket_timeout=10,
                                 decode_responses=True) for port in cluster.ports}
    ranges = [(int(first), int(last), int(primary[1]))
              for first, last, primary, *_ in clients[cluster.port].execute_command("CLUSTER", "SLOTS")]
    owned: dict[int, list[str]] = {port: [] for port in cluster.ports}
    for bucket in keys.all_buckets():
        slot = key_slot(keys.data_metrics(bucket))
        owned[next(port for first, last, port in ranges if first <= slot <= last)].append(bucket)
    return [Master(i, port, clients[port], owned[port]) for i, port in enumerate(cluster.ports)]


def tokens_written(master: Master) -> int:
    """Token events appended into the buckets this master owns (their metrics hashes' `tokens|...`)."""
    pipe = master.client.pipeline(transaction=False)
    for bucket in master.buckets:
        pipe.hgetall(keys.data_metrics(bucket))
    return sum(int(float(value)) for share in pipe.execute() for name, value in share.items()
               if name.startswith("tokens|"))


def snapshot(masters: list[Master]) -> list[dict[str, float]]:
    out = []
    for m in masters:
        cpu = m.client.info("cpu")
        stats = m.client.info("commandstats")
        out.append({"cpu": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                    "fcall": int(stats.get("cmdstat_fcall", {}).get("calls", 0)),
                    "tokens": tokens_written(m)})
    return out


def wait_workers(url: str, count: int, timeout: float = 30.0) -> None:
    """Until `count` workers have registered in the default group (so no request waits for a worker's start)."""
    client = sync_client(url, cluster=True)
    try:
        deadline = time.monotonic() + timeout
        while client.hlen(keys.group_key("default", "workers")) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} workers did not register in {timeout:g} s")
            time.sleep(0.1)
    finally:
        client.close()


# ---- the scenario --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="sg-bench-cluster-")
    cluster = EmbeddedCluster(data_dir=data_dir, masters=args.masters, persistent=False)
    slots = args.slots or -(-args.clients // args.workers)
    port = free_port()
    parts: list[Component] = []
    masters: list[Master] = []
    try:
        began = time.monotonic()
        cluster.start()
        progress(f"cluster of {args.masters} masters on ports {cluster.ports[0]}-{cluster.ports[-1]} formed in "
                 f"{time.monotonic() - began:.1f} s")
        common = ["--redis-url", cluster.url, "--redis-cluster"]
        api = Component("api", [*common, "--port", str(port)])
        parts = [api, Component("scheduler", common)] + [
            Component("worker", [*common, "--slots", str(slots), "--sim-prefill-ms", "0",
                                 "--sim-tokens-per-second", str(args.tokens_per_second)])
            for _ in range(args.workers)]
        for part in parts:
            part.start()
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process=api.process)
        wait_workers(cluster.url, args.workers)
        masters = masters_of(cluster)
        roots = [p.pid for p in parts] + [p.pid for p in cluster.processes if p is not None]
        before, cpu0, client0 = snapshot(masters), cpu_by_role(roots), cpu_seconds()
        progress(f"stack up ({args.workers} workers x {slots} slots); driving {args.sessions:,} sessions with "
                 f"{args.clients} clients")
        tally = Tally()
        seconds = asyncio.run(drive(base, args, tally))
        after, cpu1, client1 = snapshot(masters), cpu_by_role(roots), cpu_seconds()
        dbsize = [m.client.dbsize() for m in masters]
    finally:
        for part in parts:
            part.stop()
        for m in masters:
            m.client.close()
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return report(args, tally, seconds, masters, before, after, dbsize, cpu_delta(cpu0, cpu1), client1 - client0,
                  slots)


def report(args: argparse.Namespace, tally: Tally, seconds: float, masters: list[Master],
           before: list[dict[str, float]], after: list[dict[str, float]], dbsize: list[int],
           cpu: dict[str, float], client_cpu: float, slots: int) -> dict[str, Any]:
    tokens = [int(a["tokens"] - b["tokens"]) for a, b in zip(after, before, strict=True)]
    fcalls = [int(a["fcall"] - b["fcall"]) for a, b in zip(after, before, strict=True)]
    redis_cpu = [a["cpu"] - b["cpu"] for a, b in zip(after, before, strict=True)]
    rows = [{"master": f"{m.index} (:{m.port})", "buckets": len(m.buckets), "keys": dbsize[i],
             "key_share": dbsize[i] / max(1, sum(dbsize)), "tokens_appended": tokens[i],
             "append_share": tokens[i] / max(1, sum(tokens)), "fcalls": fcalls[i],
             "fcall_share": fcalls[i] / max(1, sum(fcalls)), "redis_cpu_s": redis_cpu[i],
             "redis_cores": redis_cpu[i] / seconds}
            for i, m in enumerate(masters)]
    ms = [x * 1000 for x in tally.latencies]
    summary = {"sessions": args.sessions, "requests": tally.requests, "seconds": seconds,
               "req_per_s": tally.requests / seconds, "tokens_per_s": tally.tokens / seconds,
               "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "bad_streams": len(tally.bad_streams),
               "errors": len(tally.errors), "client_cpu_s": client_cpu,
               "client_cpu_ms_per_req": 1000 * client_cpu / max(1, tally.requests)}
    print(f"\n{args.sessions:,} sessions x {args.requests_per_session} request(s) of {args.min_tokens}-"
          f"{args.max_tokens} tokens through one API on a {len(masters)}-master cluster ({args.workers} workers x "
          f"{slots} slots, sim at {args.tokens_per_second:g} tokens/s, {args.clients} clients), {seconds:.1f} s")
    print_table([summary])
    print("\nper master (keys: DBSIZE after the run; tokens: appended into the buckets it owns; fcalls and "
          "Redis CPU: during the run):")
    print_table(rows)
    print("\nCPU seconds during the run by process role:")
    print_table([{"role": r, "cpu_s": s, "cores": s / seconds} for r, s in cpu.items() if s > 0])
    expected = args.sessions * args.requests_per_session
    as_target = args.masters == CLUSTER_MASTERS  # DESIGN's 45% is for 3 masters (2 could not hold it at all)
    failures: list[str] = []  # DESIGN's: the append spread and every invariant
    check_failures: list[str] = []  # this bench's own: the key spread
    for row in rows:
        if not KEY_SHARE[0] <= row["key_share"] <= KEY_SHARE[1]:
            check_failures.append(f"master {row['master']} holds {row['key_share']:.1%} of the keys (allowed "
                                  f"{KEY_SHARE[0]:.0%}-{KEY_SHARE[1]:.0%})")
        if as_target and row["append_share"] > MAX_APPEND_SHARE:
            failures.append(f"master {row['master']} took {row['append_share']:.1%} of the token appends "
                            f"(allowed <= {MAX_APPEND_SHARE:.0%})")
    if tally.bad_streams:
        failures.append(f"{len(tally.bad_streams)} streams missed, repeated or reordered a token index, "
                        f"first: {tally.bad_streams[0]}")
    if tally.errors:
        failures.append(f"{len(tally.errors)} requests failed, first: {tally.errors[0]}")
    if tally.requests != expected:
        failures.append(f"{tally.requests} of {expected} requests completed cleanly")
    if tally.requests == 0 or tally.tokens == 0 or sum(tokens) == 0:  # no spread of nothing: not a pass
        failures.append(f"nothing measured: {tally.requests} requests, {tally.tokens} tokens received, "
                        f"{sum(tokens)} appended (--sessions x --requests-per-session = {expected})")
    if sum(tokens) != tally.tokens:
        failures.append(f"the masters' metrics count {sum(tokens):,} tokens appended, the clients received "
                        f"{tally.tokens:,}")
    target_met = not failures if as_target else None
    failures = check_failures + failures
    result = {"summary": summary, "masters": rows, "cpu_seconds": cpu, "failures": failures,
              "problems": (tally.bad_streams + tally.errors)[:20],
              "targets": {"masters": CLUSTER_MASTERS, "max_append_share": MAX_APPEND_SHARE, "met": target_met},
              "checks": {"key_share": list(KEY_SHARE), "met": not check_failures},
              "settings": {**vars(args), "slots": slots}}
    write_result("cluster", result)
    for failure in failures:
        print("FAILED:", failure)
    key_shares = ", ".join(f"{r['key_share']:.1%}" for r in rows)
    append_shares = ", ".join(f"{r['append_share']:.1%}" for r in rows)
    print(f"\n{summary['req_per_s']:,.0f} completed requests/s, {summary['tokens_per_s']:,.0f} tokens/s; "
          f"key shares {key_shares}; append shares {append_shares}: "
          + ("all within bounds" if not failures else f"{len(failures)} failure(s)"))
    verdict = verdict_word(target_met, f"DESIGN's row is for {CLUSTER_MASTERS} masters")
    print(f"target (DESIGN, {CLUSTER_MASTERS} masters): no master above {MAX_APPEND_SHARE:.0%} of the token appends, "
          f"every stream intact -> {verdict}; check (this bench's own): key shares "
          f"{KEY_SHARE[0]:.0%}-{KEY_SHARE[1]:.0%} -> {verdict_word(not check_failures)}")
    if failures:
        raise SystemExit(1)
    return result
