"""quota: a group's requests/s and tokens/s quotas while backlogged; measured rate / quota (target 0.97-1.01).

Against `sluicegate serve` (sim engine, 2 workers x 16 slots: far more capacity than either quota,
so the quota is what binds). Open-loop arrivals at `--overload` times the quota keep the group
backlogged; the quota is set through PUT /v1/admin/groups/default before the load starts.
- requests/s: dispatches per second on the server clock: the dispatches inside the measured window
  [warmup, warmup + seconds] over the window's length (a stall at either end of it counts);
- tokens/s: output tokens per second from sluicegate_tokens_total on /metrics (polled every second)
  over the same span. Tokens are reserved at dispatch and refunded at the end, so a stream cannot
  overrun the quota; the bucket starts full (one second of tokens), which the warm-up leaves out.
Each quota runs against a fresh serve.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from sluicegate.loadtest.common import ServeProcess, client_session, print_table, progress, write_result
from sluicegate.loadtest.scenarios.live import OpenLoop, fetch_views, get_json, poll_tokens, put, serve_flags
from sluicegate.loadtest.targets import QUOTA_RATIO, verdict_word


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rps", type=float, default=20.0, help="requests_per_second quota (0 = skip)")
    p.add_argument("--tps", type=float, default=2000.0, help="tokens_per_second quota (0 = skip)")
    p.add_argument("--burst", type=int, default=1, help="burst of the requests/s quota")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per quota")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (the token bucket starts full)")
    p.add_argument("--overload", type=float, default=1.5, help="offered load in multiples of the quota")
    p.add_argument("--rps-tokens", type=int, default=10, help="tokens per request under the requests/s quota")
    p.add_argument("--tps-tokens", type=int, default=50, help="tokens per request under the tokens/s quota")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slots", type=int, default=16, help="slots per worker")
    p.add_argument("--tokens-per-second", type=float, default=200.0, help="sim pace per request")
    p.add_argument("--serve-flag", action="append", default=[], metavar="FLAG", help="extra flag for serve (repeat)")
    p.add_argument("--seed", type=int, default=3)


def dispatch_rate(started_at: list[float], lo: float, hi: float) -> float:
    """Dispatches per second in [lo, hi): every dispatch inside the window over its whole length, so a stall
    at either end lowers the rate (first-to-last dispatch would leave the stall out)."""
    return sum(1 for t in started_at if lo <= t < hi) / (hi - lo) if hi > lo else float("nan")


def quota_ok(measured: float, limit: float, queued_at_end: int) -> bool:
    """DESIGN's row: the rate within QUOTA_RATIO x quota, and only while backlogged (requests left queued)."""
    return QUOTA_RATIO[0] <= measured / limit <= QUOTA_RATIO[1] and queued_at_end > 0


async def measure(args: argparse.Namespace, kind: str, quota: dict[str, Any], rate: float,
                  max_tokens: int) -> dict[str, Any]:
    serve = ServeProcess(flags=serve_flags(args.workers, args.slots, args.tokens_per_second, 0,
                                           *args.serve_flag)).start()
    try:
        async with client_session(512) as http:
            base = serve.base_url
            await put(http, base, "/v1/admin/groups/default", quota)
            total = args.warmup + args.seconds + 1
            progress(f"{kind}: quota {quota}, offering {rate:.1f} req/s of {max_tokens} tokens for {total:.0f} s")
            started = time.monotonic()
            stop = asyncio.Event()
            poller = asyncio.create_task(poll_tokens(http, base, stop, started, by="group"))
            loop = OpenLoop(http, base, rate, total, lambda n: ({"prompt": f"quota {n}", "max_tokens": max_tokens},
                                                               {}), random.Random(args.seed), prefix=kind)
            submitted = await loop.run(started)
            stop.set()
            timeline = await poller
            stats = await get_json(http, base, "/v1/admin/stats")
            group = next((g for g in stats["groups"] if g["group"] == "default"), {})
            views = await fetch_views(http, base, [s.rid for s in submitted])
    finally:
        serve.stop()
    origin = min(v["submitted_at"] for v in views.values())
    lo, hi = origin + args.warmup, origin + args.warmup + args.seconds
    rate_of_dispatches = dispatch_rate([v["started_at"] for v in views.values() if v["started_at"] is not None],
                                       lo, hi)
    first = min(timeline, key=lambda p: abs(p[0] - args.warmup))
    last = min(timeline, key=lambda p: abs(p[0] - args.warmup - args.seconds))
    token_rate = (last[1].get("default", 0.0) - first[1].get("default", 0.0)) / (last[0] - first[0])
    every = sorted(v["started_at"] - origin for v in views.values() if v["started_at"] is not None)
    per_second = [sum(1 for t in every if k <= t < k + 1) for k in range(int(args.warmup + args.seconds) + 1)]
    measured = rate_of_dispatches if kind == "requests_per_second" else token_rate
    limit = quota[kind]
    return {"quota": kind, "limit": limit, "measured": round(measured, 3), "ratio": round(measured / limit, 4),
            "dispatches_per_s": round(rate_of_dispatches, 3), "tokens_per_s": round(token_rate, 1),
            "queued_at_end": stats["queued"], "submit_errors": len(loop.errors),
            "throttled_at_end": group.get("throttled"),
            "ok": quota_ok(measured, limit, stats["queued"]),
            "dispatches_by_second": per_second,
            "tokens_timeline": [(round(t, 2), c.get("default", 0.0)) for t, c in timeline]}


async def scenario(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    if args.rps > 0:
        rows.append(await measure(args, "requests_per_second", {"requests_per_second": args.rps, "burst": args.burst},
                                  args.overload * args.rps, args.rps_tokens))
    if args.tps > 0:
        rows.append(await measure(args, "tokens_per_second", {"tokens_per_second": args.tps},
                                  args.overload * args.tps / args.tps_tokens, args.tps_tokens))
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = asyncio.run(scenario(args))
    print(f"\nGroup quota accuracy while backlogged ({args.seconds:.0f} s measured after {args.warmup:.0f} s):")
    print_table(rows, [k for k in rows[0] if k not in ("dispatches_by_second", "tokens_timeline")])
    for r in rows:
        print(f"{r['quota']}: dispatches per second {r['dispatches_by_second']}")
    print(f"target: {QUOTA_RATIO[0]:g} <= measured / quota <= {QUOTA_RATIO[1]:g} while backlogged -> " +
          ", ".join(f"{r['quota']} {verdict_word(r['ok'])}" for r in rows))
    result = {"rows": rows, "target_ratio": list(QUOTA_RATIO)}
    write_result("quota", result)
    return result
