"""GET /metrics: the cluster's counters and histograms, kept in Redis by the atomic scripts.

Any API process reports the same numbers (they are not per-process: every counter is a sum of the
Redis metrics hashes, every gauge a read of Redis state), so a scrape of any replica is complete; even
`sluicegate_open_streams`, whose counts live in the processes, is the sum of the entries each process
publishes about once a second (api/services.py `fleet_open_streams`). Histograms are
labelled by group and priority; counters also by tenant, bounded to `max_tenants` tenants plus
`tenant="~other"`, so the series stay few however many tenants call. The labelled tenants are the
first seen (sessions/metrics_store.py `labelled_tenants`) and keep their label: a re-ranking would move
a tenant's whole history between series, a counter jump that rate() reads as traffic. For the same
reason, once a tenant is summed into `~other` no tenant gets a label any more, even with a raised cap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from sluicegate.scheduler.admin import live_free_slots, live_workers
from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.metrics_store import labelled_tenants, read_metrics

# The tenant label of every tenant without one of its own: not a tenant name (keys.NAME_PATTERN has no
# "~"), so a tenant called "other" keeps its series apart from the overflow.
OTHER = "~other"
QUOTA_FIELDS = ("requests_per_second", "tokens_per_second", "burst", "burst_tokens", "max_concurrency")


class _Snapshot:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def _labels(raw: dict[str, float]) -> list[tuple[list[str], float]]:
    return [(k.split("|"), v) for k, v in raw.items()]


def ranked_tenants(totals: dict[str, dict[str, float]]) -> list[str]:
    """Every tenant in the counters, most tokens so far first (then requests, then name): the order in
    which tenants seen at the same scrape get a label while labels are left (labelled_tenants)."""
    score: dict[str, list[float]] = {}
    for name, tenant_at, slot in (("tokens", 2, 0), ("requests", 2, 1), ("depth", 2, 1)):
        for parts, value in _labels(totals.get(name, {})):
            if len(parts) > tenant_at:
                score.setdefault(parts[tenant_at], [0.0, 0.0])[slot] += max(value, 0.0)
    return sorted(score, key=lambda t: (-score[t][0], -score[t][1], t))


def top_tenants(totals: dict[str, dict[str, float]], limit: int) -> set[str]:
    """The first `limit` of ranked_tenants: the tenants a fleet labels when its first scrape sees them all."""
    return set(ranked_tenants(totals)[:limit])


def bounded(raw: dict[str, float], tenant_at: int, keep: set[str]) -> dict[str, float]:
    """The series with every tenant outside `keep` summed under OTHER (totals are preserved)."""
    out: dict[str, float] = {}
    for label, value in raw.items():
        parts = label.split("|")
        if len(parts) > tenant_at and parts[tenant_at] not in keep:
            parts[tenant_at] = OTHER
        key = "|".join(parts)
        out[key] = out.get(key, 0.0) + value
    return out


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


def _family(kind: type[Any], name: str, doc: str, labels: list[str], raw: dict[str, float]) -> Any:
    family = kind(name, doc, labels=labels)
    for parts, value in _labels(raw):
        family.add_metric(parts, max(value, 0.0) if kind is GaugeMetricFamily else value)
    return family


async def _groups_state(redis: Any, groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per group: running requests, free slots, quota settings and the live workers' slot counts
    (registry entries whose liveness key lapsed are skipped, not removed: a scrape writes nothing; so are
    the idle tickets of such a worker, which stay listed until a dispatch or a live worker's heartbeat
    drops them: a group whose last worker died has no free slot)."""
    state: dict[str, dict[str, Any]] = {}
    for group in groups:
        async with redis.pipeline(transaction=False) as pipe:  # one group's slot
            pipe.zcard(keys.group_key(group, "run"))
            pipe.llen(keys.group_key(group, "idle"))
            pipe.hgetall(keys.group_key(group, "cfg"))
            pipe.hgetall(keys.group_key(group, "workers"))
            running, idle, cfg, registered = await pipe.execute()
        workers = sorted((text(k), text(v)) for k, v in registered.items())
        live = await live_workers(redis, group, [wid for wid, _ in workers])
        slots = [_slots(info) for wid, info in workers if wid in live]
        free = await live_free_slots(redis, group, idle, (wid for wid, _ in workers if wid not in live))
        state[group] = {"running": running, "idle": free, "workers": len(slots), "slots": sum(slots),
                        "quota": {text(k): float(text(v)) for k, v in cfg.items() if text(k) in QUOTA_FIELDS}}
    return state


def _slots(info: str) -> int:
    """A worker's slot count from its registry entry (JSON, or a bare count from older workers)."""
    try:
        shown = json.loads(info)
    except ValueError:
        return 0
    return int(shown.get("slots", 0)) if isinstance(shown, dict) else int(shown)


def queue_depths(totals: dict[str, dict[str, float]]) -> dict[str, float]:
    """The depth of every (group, priority, tenant) that has submitted, 0 where nothing waits. A request
    that starts in its own submit is never counted waiting (scheduler/lua/single_server/submit_one.lua),
    so its series would otherwise be missing until one of its kind had to wait."""
    depths = {label.rsplit("|", 1)[0]: 0.0 for label in totals.get("requests", {}) if label.endswith("|submitted")}
    depths.update(totals.get("depth", {}))
    return depths


def _gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


async def render_metrics(redis: Any, *, open_streams: int, max_tenants: int = 20) -> bytes:
    """The scrape's text; `open_streams` is the fleet's (api/services.py `fleet_open_streams`)."""
    groups = sorted(text(g) for g in await redis.smembers(keys.GROUPS))
    totals = await read_metrics(redis, groups)
    keep = set(await labelled_tenants(redis, max_tenants, ranked_tenants(totals)))
    weights = {text(k): float(v) for k, v in (await redis.hgetall(keys.TENANT_WEIGHTS)).items()}
    state = await _groups_state(redis, groups)
    tenant_labels = ["group", "priority", "tenant"]
    families = [
        _family(CounterMetricFamily, "sluicegate_requests", "Requests by outcome (submitted, done, failed, "
                "cancelled).", [*tenant_labels, "status"], bounded(totals.get("requests", {}), 2, keep)),
        _family(CounterMetricFamily, "sluicegate_tokens", "Tokens streamed to sessions.", tenant_labels,
                bounded(totals.get("tokens", {}), 2, keep)),
        _family(CounterMetricFamily, "sluicegate_preemptions", "Runs stopped and requeued, by reason.",
                ["group", "priority", "reason"], totals.get("preemptions", {})),
        _family(CounterMetricFamily, "sluicegate_quota_throttled", "Scheduling decisions held back by the "
                "group's quota (work was waiting), by the limit that held them.", ["group", "reason"],
                totals.get("throttled", {})),
        _family(GaugeMetricFamily, "sluicegate_queue_depth", "Requests waiting to run.", tenant_labels,
                bounded(queue_depths(totals), 2, keep)),
        _family(CounterMetricFamily, "sluicegate_deadlines", "Deadlines (time-to-first-token objectives) met "
                "or missed, by group and priority (a request failed at its deadline counts as missed).",
                ["group", "priority", "outcome"], totals.get("deadlines", {})),
        _family(CounterMetricFamily, "sluicegate_fenced_writes", "Late writes refused from workers that lost "
                "their run.", ["group"], totals.get("fenced", {})),
        _gauge("sluicegate_running_requests", "Requests running on a worker.", ["group"],
               (([g], s["running"]) for g, s in state.items())),
        _gauge("sluicegate_workers", "Live workers (liveness key held).", ["group"],
               (([g], s["workers"]) for g, s in state.items())),
        _gauge("sluicegate_worker_slots", "Slots (concurrent requests) of the live workers.", ["group"],
               (([g], s["slots"]) for g, s in state.items())),
        _gauge("sluicegate_free_slots", "Live workers' slots waiting for a request.", ["group"],
               (([g], s["idle"]) for g, s in state.items())),
        _gauge("sluicegate_group_quota", "A group's quota setting (absent: unlimited).", ["group", "quota"],
               (([g, q], v) for g, s in state.items() for q, v in sorted(s["quota"].items()))),
        _gauge("sluicegate_tenant_weight", "Fair-share weight of each tenant with its own label.", ["tenant"],
               (([t], weights.get(t, 1.0)) for t in sorted(keep))),
        _gauge("sluicegate_open_streams", "SSE streams open on the fleet's API processes (each one's count is "
               "at most about a second old).", [], [([], open_streams)]),
        _histogram("sluicegate_request_wait_seconds", "Submission to first dispatch.", totals.get("wait", {})),
        _histogram("sluicegate_time_to_first_token_seconds", "Submission to first token.", totals.get("ttft", {})),
        _histogram("sluicegate_deadline_slack_seconds", "Time left to its deadline when a request with one was "
                   "first dispatched (0: already late).", totals.get("slack", {})),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))  # type: ignore[arg-type]
    return generate_latest(registry)
