"""Usage for chargeback: requests, input and output tokens per tenant, group and hour.

Counted where requests end: the terminal step adds them to its bucket's pending hash
(sessions/lua/includes/ended.lua), exact and atomic with the end. Reading 1024 buckets per hour would
be slow and keeping hours per bucket would multiply memory by 1024, so the pending counts are folded
into one hash per hour, `sg:usage:<hour>` (kept 35 days), by the webhooks process every few seconds
and by every usage read before it answers. A fold is three steps, each safe to repeat and to run
concurrently (see the usage_*.lua scripts): take (rename the pending hash, stamp a sequence that only
grows, whatever the server's clock does), apply to each hour once per sequence, drop. A folder that
dies half-way leaves its taken hash, which the next fold takes again with the same sequence: no count
is lost or added twice.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from sluicegate.sessions import keys
from sluicegate.sessions.callbacks import script
from sluicegate.sessions.connect import text

USAGE_TTL = 35 * 86400  # seconds an hour's usage is kept
KINDS = {"r": "requests", "i": "input_tokens", "o": "output_tokens"}
FOLD_ROUNDS = 4  # takes of one bucket per fold (fold_bucket)


async def take(redis: Any, bucket: str) -> tuple[str, dict[str, str]] | None:
    """Step 1: the bucket's pending usage, taken for folding: (its fold sequence, fields); None when none."""
    reply = await redis.eval(script("usage_take"), 3, keys.usage_pending(bucket), keys.usage_folding(bucket),
                             keys.usage_sequence(bucket), USAGE_TTL)
    if not reply:
        return None
    pairs = {text(reply[i]): text(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}
    return pairs.pop("#"), pairs


async def apply(redis: Any, bucket: str, seq: str, pairs: dict[str, str]) -> None:
    """Step 2: add a taken fold to each hour's hash (once per hour and sequence)."""
    by_hour: dict[str, list[str]] = defaultdict(list)
    for field, count in pairs.items():
        hour, _, rest = field.partition("|")  # "hour|tenant|group|kind"
        by_hour[hour] += [rest, count]
    for hour, items in by_hour.items():
        await redis.eval(script("usage_apply"), 1, keys.usage_hour(int(hour)), bucket, seq, USAGE_TTL, *items)


async def fold_bucket(redis: Any, bucket: str) -> int:
    """Fold one bucket's pending usage into the hourly hashes (take, apply, drop); returns the fields folded.
    Taken again until nothing is left: a take that finds a fold left half-way returns that one and leaves
    the counts pending since, which a read that folds first must include. At most FOLD_ROUNDS rounds (two
    suffice for that), so a bucket whose requests keep ending cannot hold its folder."""
    folded = 0
    for _ in range(FOLD_ROUNDS):
        taken = await take(redis, bucket)
        if taken is None:
            break
        seq, pairs = taken
        await apply(redis, bucket, seq, pairs)
        await redis.eval(script("usage_done"), 1, keys.usage_folding(bucket), seq)
        folded += len(pairs)
    return folded


async def fold(redis: Any) -> int:
    """Fold every bucket that has pending usage (found with one pipelined pass of EXISTS)."""
    buckets = keys.all_buckets()
    pipe = redis.pipeline(transaction=False)
    for bucket in buckets:
        pipe.exists(keys.usage_pending(bucket), keys.usage_folding(bucket))
    found = await pipe.execute()
    folded = 0
    for bucket, n in zip(buckets, found, strict=True):
        if n:
            folded += await fold_bucket(redis, bucket)
    return folded


async def usage(redis: Any, *, since: float, until: float | None = None, tenant: str | None = None,
                group: str | None = None) -> list[dict[str, Any]]:
    """Rows {hour, tenant, group, requests, input_tokens, output_tokens}, oldest hour first, for the hours
    from the one holding `since` to `until` or now (at most the 35 days kept), folding pending counts first.
    `now` is this host's clock but the hours are stamped by the store's: without `until` the hour after
    now's is read too, so counts a store running ahead put in the next hour are not missed (an hour with
    none gives no rows); an `until` given is the end asked for."""
    await fold(redis)
    now = until or time.time()
    first = max(int(since) // 3600 * 3600, int(now - USAGE_TTL) // 3600 * 3600)
    last = int(now) // 3600 * 3600 + (3600 if until is None else 0)
    hours = list(range(first, last + 1, 3600))
    pipe = redis.pipeline(transaction=False)
    for hour in hours:
        pipe.hgetall(keys.usage_hour(hour))
    rows: list[dict[str, Any]] = []
    for hour, raw in zip(hours, await pipe.execute(), strict=True):
        cells: dict[tuple[str, str], dict[str, Any]] = {}
        for field, count in raw.items():
            name = text(field)
            if name.startswith("@"):
                continue
            tenant_group, _, kind = name.rpartition("|")
            t, _, g = tenant_group.rpartition("|")
            if kind not in KINDS or (tenant and t != tenant) or (group and g != group):
                continue
            cell = cells.setdefault((t, g), {"hour": hour, "tenant": t, "group": g, "requests": 0,
                                             "input_tokens": 0, "output_tokens": 0})
            cell[KINDS[kind]] = int(count)
        rows += [cells[k] for k in sorted(cells)]
    return rows
