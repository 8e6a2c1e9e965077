"""deadlines: tight (300 ms) and loose (10 s) time-to-first-token deadlines in one class at 2x overload, on vs off.

Against `sluicegate serve` (sim engine, 2 workers x 12 slots, 10-token jobs at 25 tokens/s after a 20 ms
prefill by default: 0.38 s a run (the first token at 20 ms, 9 more 40 ms apart), ~63 requests/s of capacity) on a
scratch Valkey of its own, once with deadlines on and once with them off (a fresh server each), in one invocation.
The mix (the same arrivals in both runs, from one seed): tenants weighted 1:2:4, submitting open-loop
Poisson arrivals, together `--overload` (2) times the capacity; with `--split weighted` (the default)
each tenant at 2x its own fair share, with `--split equal` all at the same rate (then the lightest
tenant, 1/7 of the capacity for 1/3 of the load, is at 4.7x and the heaviest at 1.2x). Every tenant
stays backlogged; all in one priority class (5); `--tight-share` (10%) of each tenant's requests carry the
tight deadline, the rest the loose one, all with the default `"on_deadline_miss": "run"` (`--loose-miss
fail` makes the loose ones fail instead). Off = the same requests without `deadline_ms`: each tenant's
own requests in FIFO order. The tight load alone (10% of 2x = 0.2x of each share) fits every tenant's
share: whether tight requests start in time is then up to the order inside each tenant.
After the load stops the server keeps serving for the loose deadline + 1 s, so every request's deadline
has passed when it is read back: a request meets its deadline when its first token came at most
deadline_ms after its submit (first_token_at - submitted_at, server clock; in the on run cross-checked
with GET /v1/requests/{id} `deadline_met`). Reported for tight and loose in both runs, overall and by
10-second bucket of submit time (the backlog grows all run: a loose request that has missed its deadline
ranks before any newer tight one, so the buckets show when that starts). Fairness with deadlines on: each
tenant's share of the output tokens (sluicegate_tokens_total, after `--warmup`) against its weight share,
max relative deviation (target 2%). Decision cost: INFO latencystats of FCALL (every script call: submits,
dispatches, token appends, finishes) over the load, on vs off; the decision alone at 1M queued is
`sluicegate bench decision --million`.
Targets (issue 14): tight met >= 95% with deadlines on (the off figure beside it); fairness within 2%.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from typing import Any

from redis.asyncio import Redis

from sluicegate.loadtest.common import (
    ServeProcess,
    client_session,
    cpu_ticks,
    percentile,
    print_table,
    progress,
    scratch_server,
    steal_percent,
    write_result,
)
from sluicegate.loadtest.scenarios.fairness import deviation, shares_between
from sluicegate.loadtest.scenarios.live import OpenLoop, capacity, fetch_views, get_json, poll_tokens, put, serve_flags
from sluicegate.loadtest.targets import FAIR_SHARE_DEVIATION

KINDS = ("tight", "loose")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=35.0, help="seconds of load per run (on, then off)")
    p.add_argument("--weights", default="1,2,4", help="tenant weights")
    p.add_argument("--overload", type=float, default=2.0, help="offered load in multiples of capacity")
    p.add_argument("--tight-ms", type=int, default=300, help="the tight deadline")
    p.add_argument("--loose-ms", type=int, default=10_000, help="the loose deadline")
    p.add_argument("--tight-share", type=float, default=0.10, help="share of each tenant's requests that are tight")
    p.add_argument("--split", choices=("weighted", "equal"), default="weighted",
                   help="arrival rates: in proportion to the weights (every tenant at --overload times its share), "
                        "or equal (the lightest tenant overloaded the most)")
    p.add_argument("--loose-miss", choices=("run", "fail"), default="run", help="on_deadline_miss of loose requests")
    p.add_argument("--modes", default="on,off", help="runs to make: on, off or both")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slots", type=int, default=12, help="slots per worker")
    p.add_argument("--tokens-per-second", type=float, default=25.0, help="sim pace per request")
    p.add_argument("--prefill-ms", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=10, help="tokens per request")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds left out of the token shares")
    p.add_argument("--bucket", type=float, default=10.0, help="seconds of submit time per attainment bucket")
    p.add_argument("--serve-flag", action="append", default=[], metavar="FLAG", help="extra flag for serve (repeat)")
    p.add_argument("--seed", type=int, default=14)


def fcall_latency(info: dict[str, Any]) -> dict[str, float]:
    """FCALL's p50/p99/p99.9 in microseconds from INFO latencystats ({} where the server keeps none)."""
    raw = info.get("latency_percentiles_usec_fcall") or {}
    return {k: float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def arrival_rates(total: float, weights: list[float], split: str) -> list[float]:
    """Each tenant's arrival rate: `weighted` offers each the same multiple of its fair share (2x overload
    is 2x for every tenant); `equal` gives all the same rate, so the lightest is overloaded the most."""
    if split == "equal":
        return [total / len(weights)] * len(weights)
    return [total * w / sum(weights) for w in weights]


async def one_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One serve, one load: the same arrivals (seeded) with deadlines (`on`) or without (`off`)."""
    weights = [float(w) for w in args.weights.split(",")]
    tenants = [f"w{w:g}" for w in weights]
    targets = {t: w / sum(weights) for t, w in zip(tenants, weights, strict=True)}
    cap = capacity(args.workers * args.slots, args.max_tokens, args.tokens_per_second, args.prefill_ms)
    deadline_ms = {"tight": args.tight_ms, "loose": args.loose_ms}
    valkey = scratch_server()
    serve = ServeProcess(flags=serve_flags(args.workers, args.slots, args.tokens_per_second, args.prefill_ms,
                                           *args.serve_flag), redis_url=valkey.url)
    redis = Redis.from_url(valkey.url)
    try:
        serve.start()
        async with client_session(512) as http:
            base = serve.base_url
            for tenant, weight in zip(tenants, weights, strict=True):
                await put(http, base, f"/v1/admin/tenants/{tenant}", {"weight": weight})
            rates = arrival_rates(args.overload * cap, weights, args.split)
            progress(f"deadlines {mode}: tenants at {', '.join(f'{r:.1f}' for r in rates)} req/s for "
                     f"{args.seconds:.0f} s (capacity {cap:.1f} req/s, {args.split} split), "
                     f"{args.tight_share:.0%} tight")

            def maker(tenant: str, kinds: random.Random) -> Any:
                def make(n: int) -> tuple[dict[str, Any], dict[str, Any]]:
                    kind = "tight" if kinds.random() < args.tight_share else "loose"
                    body: dict[str, Any] = {"prompt": f"dl {tenant} {n}", "max_tokens": args.max_tokens,
                                            "tenant": tenant, "priority": 5}
                    if mode == "on":
                        body["deadline_ms"] = deadline_ms[kind]
                        body["on_deadline_miss"] = "run" if kind == "tight" else args.loose_miss
                    return body, {"tenant": tenant, "kind": kind}
                return make

            rng = random.Random(args.seed)
            loops = []
            for i, tenant in enumerate(tenants):
                arrivals, kinds = random.Random(rng.random()), random.Random(rng.random())
                loops.append(OpenLoop(http, base, rates[i], args.seconds, maker(tenant, kinds), arrivals,
                                      prefix=f"dl-{mode}-{tenant}", note_progress=i == 0))
            await redis.config_resetstat()
            ticks, started = cpu_ticks(), time.monotonic()
            stop = asyncio.Event()
            poller = asyncio.create_task(poll_tokens(http, base, stop, started))
            submitted = [s for batch in await asyncio.gather(*(loop.run(started) for loop in loops)) for s in batch]
            elapsed = time.monotonic() - started
            stop.set()
            timeline = await poller
            latency = fcall_latency(await redis.info("latencystats"))
            calls = (await redis.info("commandstats")).get("cmdstat_fcall", {})
            steal = steal_percent(ticks, cpu_ticks())
            load = os.getloadavg()[0]
            settle = args.loose_ms / 1000 + 1
            progress(f"load over; serving on for {settle:.0f} s so that every deadline has passed, then reading "
                     f"back {len(submitted)} requests")
            await asyncio.sleep(settle)
            stats = await get_json(http, base, "/v1/admin/stats")
            views = await fetch_views(http, base, [s.rid for s in submitted])
    finally:
        serve.stop()
        await redis.aclose()
        valkey.stop()
    result = analyse(args, mode, submitted, views, deadline_ms, tenants, targets, timeline, elapsed)
    result.update({"capacity_per_s": round(cap, 2), "offered_per_s": round(args.overload * cap, 2),
                   "submit_errors": sum(len(loop.errors) for loop in loops),
                   "queued_at_read_back": stats.get("queued"),
                   "fcall": {"calls": int(calls.get("calls", 0)), "usec_per_call": float(calls.get("usec_per_call", 0)),
                             **{f"{k}_us": v for k, v in latency.items()}},
                   "steal_pct": steal, "loadavg_1m": round(load, 2)})
    return result


def analyse(args: argparse.Namespace, mode: str, submitted: list[Any], views: dict[str, dict[str, Any]],
            deadline_ms: dict[str, int], tenants: list[str], targets: dict[str, float],
            timeline: list[tuple[float, dict[str, float]]], elapsed: float) -> dict[str, Any]:
    """Attainment by kind (overall, by tenant, by submit-time bucket), token shares, server disagreements."""
    counts: dict[tuple[str, str], list[int]] = {}
    buckets: dict[tuple[int, str], list[int]] = {}
    disagree = 0
    ttft: dict[str, list[float]] = {k: [] for k in KINDS}
    for s in submitted:
        view, kind = views[s.rid], s.tags["kind"]
        first = view.get("first_token_at")
        wait_ms = (first - view["submitted_at"]) * 1000 if first is not None else None
        met = wait_ms is not None and wait_ms <= deadline_ms[kind]
        if wait_ms is not None:
            ttft[kind].append(wait_ms)
        if mode == "on" and view.get("deadline_met") is not None and view["deadline_met"] != met:
            disagree += 1
        for key in ((kind, "all"), (kind, s.tags["tenant"])):
            counts.setdefault(key, [0, 0])
            counts[key][0] += met
            counts[key][1] += 1
        b = buckets.setdefault((int(s.at // args.bucket), kind), [0, 0])
        b[0] += met
        b[1] += 1
    attainment = {kind: {who: round(counts[(kind, who)][0] / counts[(kind, who)][1], 4)
                         for who in ("all", *tenants) if counts.get((kind, who), [0, 0])[1]} for kind in KINDS}
    by_bucket = [{"from_s": int(i * args.bucket),
                  **{f"{kind}_met": round(buckets[(i, kind)][0] / buckets[(i, kind)][1], 3)
                     for kind in KINDS if (i, kind) in buckets}}
                 for i in sorted({i for i, _ in buckets})]
    end = min(elapsed, timeline[-1][0])
    shares = shares_between(timeline, args.warmup, end, tenants) or {t: 0.0 for t in tenants}
    dev = deviation(shares, targets)
    ttft_p50 = {kind: round(percentile(v, 50), 1) if v else None for kind, v in ttft.items()}
    return {"mode": mode, "requests": len(submitted),
            "by_kind": {kind: counts.get((kind, "all"), [0, 0])[1] for kind in KINDS},
            "attainment": attainment, "by_bucket": by_bucket, "ttft_p50_ms": ttft_p50,
            "server_disagreements": disagree,
            "tenants": [{"tenant": t, "weight_share": round(targets[t], 4), "token_share": round(shares[t], 4),
                         "deviation": round(dev[t], 4)} for t in tenants],
            "max_deviation": round(max(dev.values()), 4), "seconds": round(end, 1)}


async def scenario(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [await one_mode(args, mode.strip()) for mode in args.modes.split(",")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs = asyncio.run(scenario(args))
    by_mode = {r["mode"]: r for r in runs}
    print(f"\n{args.overload:g}x overload, one class, tenants {args.weights.replace(',', ':')}, "
          f"{args.tight_share:.0%} tight ({args.tight_ms} ms) / loose ({args.loose_ms} ms, on miss: {args.loose_miss})")
    rows = []
    for r in runs:
        for kind in KINDS:
            a = r["attainment"].get(kind, {})
            rows.append({"deadlines": r["mode"], "kind": kind, "requests": r["by_kind"][kind],
                         "met": a.get("all", float("nan")), "ttft_p50_ms": r["ttft_p50_ms"][kind],
                         **{f"met_{t['tenant']}": a.get(t["tenant"], float("nan")) for t in r["tenants"]}})
    print_table(rows)
    for r in runs:
        print(f"\ndeadlines {r['mode']}: attainment by {args.bucket:g}-s bucket of submit time")
        print_table(r["by_bucket"])
    for r in runs:
        f = r["fcall"]
        print(f"\ndeadlines {r['mode']}: token shares (max deviation {r['max_deviation']:.2%}); FCALL "
              f"{f['calls']} calls, {f['usec_per_call']:.1f} us/call, p50 {f.get('p50_us', float('nan')):.1f} "
              f"p99 {f.get('p99_us', float('nan')):.1f} us; load {r['loadavg_1m']}, steal {r['steal_pct']}%; "
              f"submits refused {r['submit_errors']}, deadline_met disagreements {r['server_disagreements']}")
        print_table(r["tenants"])
    on = by_mode.get("on")
    targets: dict[str, Any] = {}
    if on:
        targets = {"tight_met_on": on["attainment"]["tight"].get("all"),
                   "tight_met_off": by_mode["off"]["attainment"]["tight"].get("all") if "off" in by_mode else None,
                   "tight_95pct_ok": (on["attainment"]["tight"].get("all") or 0) >= 0.95,
                   "fairness_deviation_on": on["max_deviation"],
                   "fairness_2pct_ok": on["max_deviation"] <= FAIR_SHARE_DEVIATION}
        print("\ntargets: " + ", ".join(f"{k} {v}" for k, v in targets.items()))
    result = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "runs": runs, "targets": targets}
    write_result("deadlines", result)
    return result
