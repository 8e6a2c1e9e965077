"""Reading the metrics the functions keep in Redis: each plane writes its share (every data bucket's
hash `sg:{s:BB}:m`, every group's `sg:{g:G}:m`, fields "name|labels"), and the fleet's totals are the
sums, the same from any API process."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sluicegate.sessions import keys

METRICS_CHUNK = 64  # metric hashes read per round trip (read_metrics)
SCAN_COUNT = 1000  # hash slots an HSCAN visits a step (a small hash is one listpack: read whole at once)


async def read_metrics(redis: Any, groups: Sequence[str],
                       only: Collection[str] | None = None) -> dict[str, dict[str, float]]:
    """{name: {"label|label...": value}} summed over every bucket and group; `only`: these names alone.

    Read METRICS_CHUNK hashes a round trip: over a thousand hashes in one pipeline held the server,
    and parsing the replies held this process's event loop, for tens of milliseconds at a time
    (a dashboard's stats once a second stalled every stream of its API process: the soak's TTFT p99)."""
    # The groups' shares too: their counters, and the queue depth that a deployment from before
    # 2026-12-05 counted there (its offsets still sum with the buckets'). A request's depth now moves in
    # its own bucket's hash alone, so a read across chunks never sees it counted twice or negative.
    names = [keys.group_metrics(g) for g in groups] + [keys.data_metrics(b) for b in keys.all_buckets()]
    totals: dict[str, dict[str, float]] = {}
    for start in range(0, len(names), METRICS_CHUNK):
        chunk = names[start:start + METRICS_CHUNK]
        for share in await (_read_all(redis, chunk) if only is None else _read_named(redis, chunk, only)):
            for field, value in share.items():
                field = field.decode() if isinstance(field, bytes) else field
                metric, _, label = field.partition("|")
                if only is not None and metric not in only:
                    continue
                series = totals.setdefault(metric, {})
                series[label] = series.get(label, 0.0) + float(value)
    return totals


async def _read_all(redis: Any, names: Sequence[str]) -> list[dict[Any, Any]]:
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        return list(await pipe.execute())


async def _read_named(redis: Any, names: Sequence[str], only: Collection[str]) -> list[dict[Any, Any]]:
    """The fields of the `only` metrics, picked by the server (HSCAN MATCH "name|*"): a bucket's hash
    holds every metric's fields, and parsing the ones not asked for was most of a stats call's CPU. A
    small hash (a listpack) is read whole in one step, as HGETALL read it; a large one is walked, so a
    field added meanwhile may be read at the next call (these are gauges and counters for display)."""
    wanted = [(name, f"{metric}|*") for name in names for metric in dict.fromkeys(only)]
    async with redis.pipeline(transaction=False) as pipe:
        for name, pattern in wanted:
            pipe.hscan(name, 0, match=pattern, count=SCAN_COUNT)
        replies = await pipe.execute()
    shares = []
    for (name, pattern), (cursor, fields) in zip(wanted, replies, strict=True):
        while int(cursor):  # a large hash (not one listpack) is walked in steps
            cursor, more = await redis.hscan(name, cursor, match=pattern, count=SCAN_COUNT)
            fields = {**fields, **more}
        shares.append(fields)
    return shares
