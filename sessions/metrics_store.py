"""Reading the metrics the functions keep in Redis: each plane writes its share (every data bucket's
hash `sg:{s:BB}:m`, every group's `sg:{g:G}:m`, fields "name|labels"), and the fleet's totals are the
sums, the same from any API process. Also the fleet's set of tenants with a label of their own on
/metrics (`sg:metrics_tenants`), the same from any API process too."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text

METRICS_CHUNK = 64  # metric hashes read per round trip (read_metrics)
SCAN_COUNT = 1000  # hash slots an HSCAN visits a step (a small hash is one listpack: read whole at once)
LABELLED_TENANTS = keys.PREFIX + "metrics_tenants"  # sorted set tenant -> admission order (1 first)
ADMIT_SCRIPT = Path(__file__).parent / "lua" / "standalone" / "metrics_tenants.lua"
# Not a tenant (keys.NAME_PATTERN has no "~"): the member of LABELLED_TENANTS after which no one is labelled,
# added once a scrape summed a seen tenant into the overflow (labelled_tenants).
CLOSED = "~closed"
CLOSE_CAP = 2**31 - 1  # the cap the admission script is given to add CLOSED, however many the set holds


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


@cache
def _admit_source() -> str:
    return ADMIT_SCRIPT.read_text()


def _before_closed(members: Sequence[Any]) -> list[str]:
    """The tenants before CLOSED (all of them when it is not among `members`)."""
    names = [text(m) for m in members]
    return names[:names.index(CLOSED)] if CLOSED in names else names


async def labelled_tenants(redis: Any, cap: int, seen: Sequence[str]) -> list[str]:
    """The tenants with a label of their own: the first `cap` admitted, fleet-wide. While fewer hold
    one, the `seen` ones without a label are admitted in that order (atomically: no scrape labels more
    than `cap`). Never re-ranked: a tenant that lost its label would carry its whole history into the
    overflow series, a counter jump with no traffic behind it. Nor taken out of the overflow: once a
    seen tenant is left without a label, CLOSED follows the labelled ones, and no tenant after it gets a
    label (a raised cap, or a process with a higher one, labels no one new). Deleting the key picks again."""
    if cap < 1:
        return []
    async with redis.pipeline(transaction=False) as pipe:  # one key: one round trip, in a cluster too
        pipe.zrange(LABELLED_TENANTS, 0, cap - 1)
        pipe.zscore(LABELLED_TENANTS, CLOSED)
        members, closed = await pipe.execute()
    labelled = _before_closed(members)
    if closed is not None or not set(seen).difference(labelled):  # the usual case: one read
        return labelled
    if len(labelled) < cap:
        have = set(labelled)
        # `cap` of them at most: enough to fill the set even if another process admitted some meanwhile
        candidates = [t for t in seen if t not in have][:cap]
        labelled = _before_closed(await redis.eval(_admit_source(), 1, LABELLED_TENANTS, cap, *candidates))[:cap]
    if set(seen).difference(labelled):
        # Some seen tenant is summed into the overflow: close the set before this scrape says so. CLOSED goes
        # last (the admission script appends it, atomically), so the tenants labelled so far keep their labels
        # and anyone admitted after it by a scrape that read the set before it is no one's label either.
        await redis.eval(_admit_source(), 1, LABELLED_TENANTS, CLOSE_CAP, CLOSED)
    return labelled
