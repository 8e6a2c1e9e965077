"""GET /metrics: the cluster's counters and histograms, kept in Redis by the atomic scripts.

Any API process reports the same totals (they are not per-process), so a scrape of any replica is
complete. Histograms are labelled by group and priority; counters also by tenant.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.metrics_store import read_metrics


class _Snapshot:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def _labels(raw: dict[str, float]) -> list[tuple[list[str], float]]:
    return [(k.split("|"), v) for k, v in raw.items()]


def _histogram(name: str, doc: str, raw: dict[str, float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["group", "priority"])
    series: dict[tuple[str, str], dict[str, float]] = {}
    for parts, value in _labels(raw):
        group, priority, slot = parts
        series.setdefault((group, priority), {})[slot] = value
    for (group, priority), slots in sorted(series.items()):
        cumulative, buckets = 0.0, []
        for i, bound in enumerate(keys.BUCKETS, start=1):
            cumulative += slots.get(str(i), 0.0)
            buckets.append((repr(bound), cumulative))
        cumulative += slots.get(str(len(keys.BUCKETS) + 1), 0.0)
        buckets.append(("+Inf", cumulative))
        family.add_metric([group, priority], buckets, slots.get("sum", 0.0))
    return family


async def render_metrics(redis: Any, *, open_streams: int) -> bytes:
    groups = sorted(text(g) for g in await redis.smembers(keys.GROUPS))
    totals = await read_metrics(redis, groups)
    requests, tokens, preemptions, depth, wait, ttft, fenced = (
        totals.get(name, {}) for name in ("requests", "tokens", "preemptions", "depth", "wait", "ttft", "fenced"))
    running = 0
    for group in groups:
        running += await redis.zcard(keys.group_key(group, "run"))

    req = CounterMetricFamily("sluicegate_requests", "Requests by outcome (submitted, done, failed, cancelled).",
                              labels=["group", "priority", "tenant", "status"])
    for parts, value in _labels(requests):
        req.add_metric(parts, value)
    tok = CounterMetricFamily("sluicegate_tokens", "Tokens streamed to sessions.",
                              labels=["group", "priority", "tenant"])
    for parts, value in _labels(tokens):
        tok.add_metric(parts, value)
    pre = CounterMetricFamily("sluicegate_preemptions", "Runs stopped and requeued, by reason.",
                              labels=["group", "priority", "reason"])
    for parts, value in _labels(preemptions):
        pre.add_metric(parts, value)
    dep = GaugeMetricFamily("sluicegate_queue_depth", "Requests waiting to run.",
                            labels=["group", "priority", "tenant"])
    for parts, value in _labels(depth):
        dep.add_metric(parts, max(value, 0.0))
    fen = CounterMetricFamily("sluicegate_fenced_writes", "Late writes refused from workers that lost their run.",
                              labels=["group"])
    for parts, value in _labels(fenced):
        fen.add_metric(parts, value)
    run = GaugeMetricFamily("sluicegate_running_requests", "Requests running on a worker.")
    run.add_metric([], running)
    streams = GaugeMetricFamily("sluicegate_open_streams", "SSE streams open on this API process.")
    streams.add_metric([], open_streams)
    families = [req, tok, pre, dep, fen, run, streams,
                _histogram("sluicegate_request_wait_seconds", "Submission to first dispatch.", wait),
                _histogram("sluicegate_time_to_first_token_seconds", "Submission to first token.", ttft)]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))  # type: ignore[arg-type]
    return generate_latest(registry)
