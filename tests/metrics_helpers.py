"""Reading /metrics in tests: every sample as {(name, labels): value}, and waiting for requests to end."""

from __future__ import annotations

import urllib.request

import redis
from prometheus_client.parser import text_string_to_metric_families

from sluicegate.sessions import keys
from tests.helpers import call, wait_for

Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(base_url: str, headers: dict[str, str] | None = None) -> dict[Sample, float]:
    """Every sample of GET /metrics, keyed by name and sorted labels."""
    request = urllib.request.Request(f"{base_url}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def series(samples: dict[Sample, float], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric name, keyed by their labels."""
    return {labels: value for (n, labels), value in samples.items() if n == name}


def total(samples: dict[Sample, float], name: str, **match: str) -> float:
    """The sum of a metric over the samples whose labels include `match`."""
    return sum(v for labels, v in series(samples, name).items() if match.items() <= dict(labels).items())


def tenants(samples: dict[Sample, float], name: str) -> set[str]:
    return {dict(labels)["tenant"] for labels in series(samples, name)}


def wait_done(base_url: str, rids: list[str], timeout: float = 30) -> None:
    """Until every request ended (the counters then stop moving)."""
    def ended() -> bool:
        return all(call("GET", f"{base_url}/v1/requests/{rid}")[1]["status"] in ("done", "failed", "cancelled")
                   for rid in rids)

    wait_for(ended, timeout=timeout, interval=0.1, what="the requests to end")


def raw_depths(r: redis.Redis, groups: list[str]) -> dict[str, float]:
    """The queue depth as the planes count it, summed: unclipped (the gauge shows a negative as 0)."""
    depth: dict[str, float] = {}
    for name in [keys.data_metrics(b) for b in keys.all_buckets()] + [keys.group_metrics(g) for g in groups]:
        for field, value in r.hgetall(name).items():
            if field.startswith("depth|"):
                depth[field] = depth.get(field, 0) + float(value)
    return depth
