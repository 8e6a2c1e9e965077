"""Reading the metrics the functions keep in Redis: each plane writes its share (every data bucket's
hash `sg:{s:BB}:m`, every group's `sg:{g:G}:m`, fields "name|labels"), and the fleet's totals are the
sums, the same from any API process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sluicegate.sessions import keys


async def read_metrics(redis: Any, groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """{name: {"label|label...": value}} summed over every bucket and group."""
    names = [keys.data_metrics(b) for b in keys.all_buckets()] + [keys.group_metrics(g) for g in groups]
    totals: dict[str, dict[str, float]] = {}
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        shares = await pipe.execute()
    for share in shares:
        for field, value in share.items():
            field = field.decode() if isinstance(field, bytes) else field
            metric, _, label = field.partition("|")
            series = totals.setdefault(metric, {})
            series[label] = series.get(label, 0.0) + float(value)
    return totals
