"""rq's per-job cost against Sluicegate's per-request dispatch path: why rq stays off the request path.

On one scratch Valkey server (AOF everysec, like `sluicegate serve`):
- rq: `Queue.enqueue` of a trivial job, N times (wall time per enqueue); then a `SimpleWorker`
  (no fork) drains the N jobs in burst mode with logging off (wall time per job: dequeue, status
  writes, execution, result, registries).
- Sluicegate: the same N requests through `SessionStore.submit` (one script: store, queue, ready set,
  dispatch into a free slot ticket of a registered worker), the worker side picking the assignment
  from its inbox (`RunStore.next_assignment`, which carries the run spec; `RunStore.spec` builds it
  without a round trip), and `finish` (which hands the slot back and
  dispatches the next request), i.e. the whole per-request lifecycle minus the tokens.
Also the server-side cost of each script (INFO commandstats, microseconds per call).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import redis
from redis.asyncio import Redis
from rq import Queue, SimpleWorker

from sluicegate.loadtest.common import percentile, print_table, progress, scratch_server, write_result
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.resp import LeanRedis
from sluicegate.sessions.runs import RunStore
from sluicegate.sessions.store import SessionStore


def trivial_job() -> int:
    return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--jobs", type=int, default=2000, help="jobs / requests of each kind")
    parser.add_argument("--no-aof", action="store_true", help="run the server without AOF")


def measure_rq(url: str, n: int) -> dict[str, Any]:
    connection = redis.Redis.from_url(url)
    queue = Queue("bench", connection=connection)
    enqueue_ms = []
    for _ in range(n):
        began = time.perf_counter()
        queue.enqueue(trivial_job)
        enqueue_ms.append((time.perf_counter() - began) * 1000)
    worker = SimpleWorker([queue], connection=connection)
    logging.getLogger("rq.worker").setLevel(logging.ERROR)
    began = time.perf_counter()
    worker.work(burst=True, logging_level="ERROR", max_jobs=n)
    elapsed = time.perf_counter() - began
    processed = queue.finished_job_registry.count
    failed = queue.failed_job_registry.count
    assert processed == n and failed == 0 and len(queue) == 0, (processed, failed, len(queue))
    connection.close()
    return {"enqueue_ms": enqueue_ms, "worker_ms_per_job": elapsed * 1000 / max(1, processed), "processed": processed}


async def measure_sluicegate(url: str, n: int) -> dict[str, Any]:
    client = Redis.from_url(url)
    lean = LeanRedis(url)  # as the API has it
    store = SessionStore(client, session_ttl=3600, lease_seconds=600, lean=lean)
    worker = RunStore.connect(url, worker_id="bench.rq-cost.0.x", group="bench", lease_seconds=600, session_ttl=3600)
    await worker.set_free_slots(1)
    spans: dict[str, list[float]] = {"submit+dispatch": [], "pickup (BRPOP inbox)": [], "spec": [], "finish": []}
    for i in range(n):
        req = NewRequest(session_id=f"rq-cost-{i}", max_tokens=16, priority=5, tenant="t", group="bench",
                         prompt="tell me about the river that runs under the stone mill")
        t0 = time.perf_counter()
        result = await store.submit(req)
        t1 = time.perf_counter()
        assignment = await worker.next_assignment(timeout=5)
        t2 = time.perf_counter()
        assert result.outcome == "ok" and assignment is not None and assignment.request_id == req.request_id, assignment
        spec = await worker.spec(assignment)
        t3 = time.perf_counter()
        assert spec is not None
        finished = await worker.finish(assignment.request_id, assignment.attempt, outcome="done", detail="length",
                                       return_slot=True)
        t4 = time.perf_counter()
        assert finished
        for name, a, b in (("submit+dispatch", t0, t1), ("pickup (BRPOP inbox)", t1, t2), ("spec", t2, t3),
                           ("finish", t3, t4)):
            spans[name].append((b - a) * 1000)
    await worker.aclose()
    await lean.aclose()
    await client.aclose()
    return spans


def script_costs(client: redis.Redis) -> list[dict[str, Any]]:
    """Server-side microseconds per call of each command (fcall = the scripts) and of rq's commands."""
    stats = client.info("commandstats")
    rows = []
    for name, s in sorted(stats.items(), key=lambda kv: -kv[1]["usec"]):
        rows.append({"command": name.removeprefix("cmdstat_"), "calls": s["calls"],
                     "usec_per_call": s["usec_per_call"], "total_ms": s["usec"] / 1000})
    return rows[:12]


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = scratch_server(persistent=not args.no_aof)
    try:
        client = redis.Redis.from_url(server.url)
        progress(f"rq: enqueue {args.jobs} jobs, then a SimpleWorker drains them")
        rq_out = measure_rq(server.url, args.jobs)
        rq_stats = script_costs(client)
        client.config_resetstat()
        progress(f"sluicegate: {args.jobs} requests through submit -> dispatch -> pickup -> finish")
        sg = asyncio.run(measure_sluicegate(server.url, args.jobs))
        sg_stats = script_costs(client)
        client.close()
    finally:
        server.stop()
    rows = [{"system": "rq", "step": "enqueue", "p50_ms": percentile(rq_out["enqueue_ms"], 50),
             "p99_ms": percentile(rq_out["enqueue_ms"], 99),
             "mean_ms": sum(rq_out["enqueue_ms"]) / len(rq_out["enqueue_ms"])},
            {"system": "rq", "step": f"SimpleWorker per job ({rq_out['processed']} jobs)", "p50_ms": "",
             "p99_ms": "", "mean_ms": rq_out["worker_ms_per_job"]},
            {"system": "rq", "step": "enqueue + worker", "p50_ms": "", "p99_ms": "",
             "mean_ms": sum(rq_out["enqueue_ms"]) / len(rq_out["enqueue_ms"]) + rq_out["worker_ms_per_job"]}]
    total = 0.0
    for step, values in sg.items():
        mean = sum(values) / len(values)
        total += mean
        rows.append({"system": "sluicegate", "step": step, "p50_ms": percentile(values, 50),
                     "p99_ms": percentile(values, 99), "mean_ms": mean})
    rows.append({"system": "sluicegate", "step": "whole lifecycle", "p50_ms": "", "p99_ms": "", "mean_ms": total})
    print(f"\nper-job / per-request cost, {args.jobs} of each, sequential, loopback Valkey "
          f"({'no AOF' if args.no_aof else 'AOF everysec'})")
    print_table(rows)
    print("\nserver-side cost per command, rq run:")
    print_table(rq_stats)
    print("\nserver-side cost per command, sluicegate run (fcall = the Lua scripts):")
    print_table(sg_stats)
    rq_total = rows[2]["mean_ms"]
    print(f"\nrq: {rq_total:.2f} ms per job before any token; sluicegate: {total:.2f} ms per request "
          f"({rq_total / total:.1f}x less)")
    result = {"rows": rows, "rq_ms_per_job": rq_total, "sluicegate_ms_per_request": total,
              "rq_commandstats": rq_stats, "sluicegate_commandstats": sg_stats,
              "settings": {"jobs": args.jobs, "aof": not args.no_aof}}
    write_result("rq_cost", result)
    return result
