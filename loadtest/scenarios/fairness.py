"""fairness: tenants weighted 1:2:4:8 with equal demand at 3x overload; token share against weight share.

Against `sluicegate serve` (sim engine, 2 workers x 8 slots, 100-token jobs at 100 tokens/s by
default). Each tenant submits open-loop Poisson arrivals at the same rate, together `--overload`
times what the group completes, so every tenant stays backlogged. Output tokens per tenant come from
the server's own counter (sluicegate_tokens_total on /metrics, polled every second).
Reported per estimate ratio (`--output-estimate-ratio` of the scheduler: 1.0 exact, 0.5 and 1.5 =
output estimates off by -50% / +50%, reconciled when each request ends):
- each tenant's share of output tokens over the run (after `--warmup`) and in every `--window`
  second window (sliding by 10 s, and the run's last one), as relative deviation from its weight share
  (targets, from DESIGN.md: 2% over the run, 5% per 60 s window); a window with no tokens while
  requests waited is a failed window (every share 0: a deviation of 100%), not one left out;
- Jain's index of the weight-normalised shares (target >= 0.999);
- the longest time a backlogged tenant went without a dispatch (checked < 10 s: a check of this
  bench's own, not a DESIGN target), and the longest wait of any request against the class max wait + 1 s.
DESIGN's row is for 2-3x overload and 60 s windows: another `--overload` gets no verdict, another
`--window` (or a run with no whole window) none on the per-window target (printed "no verdict ...").
Aging runs at the product default (`--max-wait-seconds 60`): it promotes only requests starved by
a higher class, and here every request is in one class, so fair share alone decides. In one class
at sustained 3x overload queues grow without bound, so "wait <= class max wait + 1 s" cannot hold
and is reported for information, not as a target.
Writes docs/fairness_share.png (not with `--no-plot`): token share by tenant per 10 s window, one panel per ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from sluicegate.loadtest import plots
from sluicegate.loadtest.common import ServeProcess, client_session, print_table, progress, write_result
from sluicegate.loadtest.scenarios.live import OpenLoop, capacity, fetch_views, get_json, poll_tokens, put, serve_flags
from sluicegate.loadtest.targets import (
    FAIR_JAIN_MIN,
    FAIR_OVERLOAD,
    FAIR_SHARE_DEVIATION,
    FAIR_WINDOW_DEVIATION,
    FAIR_WINDOW_S,
    verdict_word,
)

# The longest a backlogged tenant may go without a dispatch: a check of this bench's own, not a DESIGN target.
GAP_CHECK_S = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=90.0, help="seconds of load per estimate ratio")
    p.add_argument("--weights", default="1,2,4,8", help="tenant weights")
    p.add_argument("--overload", type=float, default=3.0, help="total demand in multiples of capacity")
    p.add_argument("--estimate-ratios", default="1.0,0.5,1.5",
                   help="scheduler --output-estimate-ratio values to run (one serve each)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slots", type=int, default=8, help="slots per worker")
    p.add_argument("--tokens-per-second", type=float, default=100.0, help="sim pace per request")
    p.add_argument("--prefill-ms", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=100, help="tokens per request")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds left out of the shares")
    p.add_argument("--window", type=float, default=FAIR_WINDOW_S,
                   help="window for per-window shares (DESIGN's per-window target is for 60 s)")
    p.add_argument("--max-wait-seconds", type=float, default=60.0, help="class max wait (aging) of the serve")
    p.add_argument("--serve-flag", action="append", default=[], metavar="FLAG", help="extra flag for serve (repeat)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--no-plot", action="store_true", help="do not write docs/fairness_share.png")


def jain(values: list[float]) -> float:
    """Jain's index; 0.0 (a miss) when every value is 0: a group that served no token after the warm-up."""
    if not values:
        return float("nan")
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares > 0 else 0.0


def shares_between(timeline: list[tuple[float, dict[str, float]]], t0: float, t1: float,
                   tenants: list[str]) -> dict[str, float] | None:
    """Each tenant's share of the tokens produced between the polls nearest t0 and t1."""
    first = min(timeline, key=lambda p: abs(p[0] - t0))[1]
    last = min(timeline, key=lambda p: abs(p[0] - t1))[1]
    produced = {t: last.get(t, 0.0) - first.get(t, 0.0) for t in tenants}
    total = sum(produced.values())
    return {t: v / total for t, v in produced.items()} if total > 0 else None


def deviation(shares: dict[str, float], targets: dict[str, float]) -> dict[str, float]:
    return {t: abs(shares[t] - targets[t]) / targets[t] for t in targets}


def window_starts(warmup: float, end: float, window: float) -> tuple[list[float], float]:
    """The windows' starts (every 10 s, plus one ending at `end` so the run's tail is judged too) and length;
    one window of the whole span when the span is shorter than a window."""
    span = max(end - warmup, 0.0)
    if span < window:
        return [warmup], span
    starts = [warmup + 10 * i for i in range(int((span - window) // 10) + 1)]
    if end - window - starts[-1] > 1e-6:
        starts.append(end - window)
    return starts, window


def waiting_at(views: dict[str, dict[str, Any]], at: float) -> bool:
    """Whether some request (server clock) had been submitted and not yet started at `at`."""
    return any(v["submitted_at"] <= at and (v["started_at"] is None or v["started_at"] > at) for v in views.values())


def design_verdicts(args: argparse.Namespace, length: float) -> tuple[bool, bool]:
    """(the setup is DESIGN's row: 2-3x overload; its windows are DESIGN's: 60 s long)."""
    row = FAIR_OVERLOAD[0] <= args.overload <= FAIR_OVERLOAD[1]
    return row, row and args.window == FAIR_WINDOW_S and length == FAIR_WINDOW_S


def off_design(met: bool | None) -> str:
    """A target's verdict word, saying why there is none off DESIGN's setup."""
    return verdict_word(met, f"DESIGN's row is for {FAIR_OVERLOAD[0]:g}-{FAIR_OVERLOAD[1]:g}x overload, "
                             f"{FAIR_WINDOW_S:g} s windows")


async def one_ratio(args: argparse.Namespace, ratio: float) -> dict[str, Any]:
    weights = [float(w) for w in args.weights.split(",")]
    tenants = [f"w{w:g}" for w in weights]
    targets = {t: w / sum(weights) for t, w in zip(tenants, weights, strict=True)}
    slots = args.workers * args.slots
    cap = capacity(slots, args.max_tokens, args.tokens_per_second, args.prefill_ms)
    flags = serve_flags(args.workers, args.slots, args.tokens_per_second, args.prefill_ms,
                        "--output-estimate-ratio", str(ratio), "--max-wait-seconds", str(args.max_wait_seconds),
                        *args.serve_flag)
    serve = ServeProcess(flags=flags).start()
    try:
        async with client_session(512) as http:
            base = serve.base_url
            for tenant, weight in zip(tenants, weights, strict=True):
                await put(http, base, f"/v1/admin/tenants/{tenant}", {"weight": weight})
            rate = args.overload * cap / len(tenants)
            progress(f"estimate ratio {ratio}: {len(tenants)} tenants x {rate:.1f} req/s for {args.seconds:.0f} s "
                     f"(capacity {cap:.1f} req/s, {cap * args.max_tokens:.0f} tokens/s)")
            rng = random.Random(args.seed)
            started = time.monotonic()
            stop = asyncio.Event()
            poller = asyncio.create_task(poll_tokens(http, base, stop, started))
            loops = [OpenLoop(http, base, rate, args.seconds,
                              lambda n, t=tenant: ({"prompt": f"fair {t} {n}", "max_tokens": args.max_tokens,
                                                    "tenant": t, "priority": 5}, {"tenant": t}),
                              random.Random(rng.random()), prefix=f"f{ratio}-{tenant}", note_progress=i == 0)
                     for i, tenant in enumerate(tenants)]
            submitted = [s for batch in await asyncio.gather(*(loop.run(started) for loop in loops)) for s in batch]
            elapsed = time.monotonic() - started
            submit_errors = sum(len(loop.errors) for loop in loops)
            stop.set()
            timeline = await poller
            stats = await get_json(http, base, "/v1/admin/stats")
            backlog = {t: 0 for t in tenants}
            for row in stats["queue_depth"]:
                if row["tenant"] in backlog:
                    backlog[row["tenant"]] += row["queued"]
            progress(f"reading back {len(submitted)} requests")
            views = await fetch_views(http, base, [s.rid for s in submitted])
    finally:
        serve.stop()
    return {**analyse(args, ratio, tenants, targets, timeline, views, elapsed, backlog),
            "submit_errors": submit_errors}


def analyse(args: argparse.Namespace, ratio: float, tenants: list[str], targets: dict[str, float],
            timeline: list[tuple[float, dict[str, float]]], views: dict[str, dict[str, Any]], elapsed: float,
            backlog: dict[str, int]) -> dict[str, Any]:
    end = min(elapsed, timeline[-1][0])
    overall = shares_between(timeline, args.warmup, end, tenants) or {t: 0.0 for t in tenants}
    over_dev = deviation(overall, targets)
    windows = []
    starts, length = window_starts(args.warmup, end, args.window)
    origin = min(v["submitted_at"] for v in views.values())
    for s in starts:
        shares = shares_between(timeline, s, s + length, tenants)
        if shares is None and waiting_at(views, origin + s):  # backlogged, yet served nothing: every share 0
            shares = {t: 0.0 for t in tenants}
        if shares:
            windows.append({"from_s": round(s, 1), "to_s": round(s + length, 1),
                            "max_dev": max(deviation(shares, targets).values()), "shares": shares})
    normalised = [overall[t] / targets[t] for t in tenants]
    # Dispatch gaps on the server clock, inside the measured span.
    lo, hi = origin + args.warmup, origin + end
    gaps = {}
    for tenant in tenants:
        starts_t = sorted(v["started_at"] for v in views.values()
                          if v["tenant"] == tenant and v["started_at"] is not None and lo <= v["started_at"] <= hi)
        points = [lo, *starts_t, hi]
        gaps[tenant] = max(b - a for a, b in zip(points, points[1:], strict=False))
    waits = [v["started_at"] - v["submitted_at"] for v in views.values() if v["started_at"] is not None]
    oldest_unstarted = max((origin + elapsed - v["submitted_at"] for v in views.values() if v["started_at"] is None),
                           default=0.0)
    plot_times, plot_shares = [], {t: [] for t in tenants}
    for t_poll, _ in timeline:
        if t_poll >= 10:
            shares = shares_between(timeline, t_poll - 10, t_poll, tenants)
            if shares:
                plot_times.append(t_poll)
                for t in tenants:
                    plot_shares[t].append(shares[t])
    worst_window = max((w["max_dev"] for w in windows), default=float("nan"))
    as_row, as_windows = design_verdicts(args, length)
    return {
        "estimate_ratio": ratio, "seconds": round(end, 1), "requests": len(views),
        "tenants": [{"tenant": t, "weight_share": round(targets[t], 4), "token_share": round(overall[t], 4),
                     "deviation": round(over_dev[t], 4), "longest_gap_s": round(gaps[t], 2),
                     "queued_at_end": backlog[t]} for t in tenants],
        "max_deviation": max(over_dev.values()), "worst_window_deviation": worst_window,
        "window_seconds": round(length, 1), "windows": windows, "jain": jain(normalised),
        "longest_gap_s": max(gaps.values()), "max_wait_s": max(waits, default=0.0),
        "oldest_unstarted_s": oldest_unstarted, "class_max_wait_s": args.max_wait_seconds,
        "targets_ok": {"share": max(over_dev.values()) <= FAIR_SHARE_DEVIATION if as_row else None,
                       "window": worst_window <= FAIR_WINDOW_DEVIATION if as_windows else None,
                       "jain": jain(normalised) >= FAIR_JAIN_MIN if as_row else None},
        "target_values": {"share_deviation": FAIR_SHARE_DEVIATION, "window_deviation": FAIR_WINDOW_DEVIATION,
                          "window_seconds": FAIR_WINDOW_S, "jain_min": FAIR_JAIN_MIN,
                          "overload": list(FAIR_OVERLOAD)},
        "checks_ok": {"gap_under_10s": max(gaps.values()) < GAP_CHECK_S,
                      "all_backlogged_at_end": all(backlog[t] > 0 for t in tenants)},
        "plot": {"times": plot_times, "shares": plot_shares, "targets": targets},
    }


async def scenario(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [await one_ratio(args, float(r)) for r in args.estimate_ratios.split(",")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = asyncio.run(scenario(args))
    for r in results:
        print(f"\nestimate ratio {r['estimate_ratio']} ({r['seconds']:.0f} s, {r['requests']} requests, "
              f"{args.overload}x overload):")
        print_table(r["tenants"])
        print(f"max deviation over the run {r['max_deviation']:.1%} (target {FAIR_SHARE_DEVIATION:.0%}), worst "
              f"{r['window_seconds']:.0f}-s window {r['worst_window_deviation']:.1%} (target "
              f"{FAIR_WINDOW_DEVIATION:.0%} per {FAIR_WINDOW_S:.0f}-s window), Jain {r['jain']:.4f} (target "
              f">= {FAIR_JAIN_MIN:g}), longest gap {r['longest_gap_s']:.2f} s (check < {GAP_CHECK_S:g}), max wait "
              f"{r['max_wait_s']:.1f} s (class max wait {r['class_max_wait_s']:.0f} s), submits refused "
              f"{r['submit_errors']}")
        print("targets: " + ", ".join(f"{k} {off_design(v)}" for k, v in r["targets_ok"].items())
              + "; checks: " + ", ".join(f"{k} {verdict_word(v)}" for k, v in r["checks_ok"].items()))
    panels = [(f"estimate ratio {r['estimate_ratio']}", r["plot"]["times"], r["plot"]["shares"]) for r in results]
    if not args.no_plot:
        plots.fairness_share(panels, results[0]["plot"]["targets"],
                             title=f"Token share by tenant (weights {args.weights.replace(',', ':')}, "
                                   f"{args.overload:g}x overload, 10 s windows)")
    result = {"runs": [{k: v for k, v in r.items() if k != "plot"} for r in results]}
    write_result("fairness", result)
    return result
