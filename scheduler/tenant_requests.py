"""A tenant's live requests (queued or running), found from the indexes the scheduler already keeps per
tenant, and the seeding of its `max_queued` admission set (sessions/keys.py `tenant_active`) with them.

`max_queued` counts a tenant's requests in that set, which only submits made while the tenant was
limited write to. Requests it already had when the limit was set, or that an API process admitted as
unlimited while its cached limits lagged (api/guardrails.py, a few seconds), are found here: when the
limit is set (write_limits) and whenever the admission's lazy check of a full set runs (api/admission.py).

Where they are, in each group's control plane: `c<P>:<T>`, the tenant's ready sessions of class P
(the classes with ready work are in `cls`), and `rt:<T>`, its running runs ("rid|attempt"). Every
request of such a session is in its lite queue (its head is the ready or running one, the rest wait
behind it), and a session holds one tenant's requests. Not seen, for a moment: a session between two
steps of a transition (a submit whose control step is in the outbox, a run being stopped): the next
check finds it. Reads only, a few round trips: one per step, pipelined, each command on its own key's
slot (a cluster routes them).
"""

from __future__ import annotations

import time
from typing import Any

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.registry import DEFAULT_GROUP

KEEP_SECONDS = 7 * 86400  # a tenant's admission set goes away this long after its last write


async def _pipelined(redis: Any, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
    if not calls:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name, args in calls:
            getattr(pipe, name)(*args)
        return list(await pipe.execute())


async def live_requests(redis: Any, tenant: str) -> set[str]:
    """Ids of the tenant's requests that are queued or running (in any group)."""
    groups = sorted({text(g) for g in await redis.smembers(keys.GROUPS)} | {DEFAULT_GROUP})
    first = await _pipelined(redis, [call for g in groups for call in (
        ("zrange", (keys.group_key(g, "cls"), 0, -1)), ("zrange", (keys.group_key(g, f"rt:{tenant}"), 0, -1)))])
    ready_sets: list[tuple[str, tuple[Any, ...]]] = []
    running: list[str] = []
    for g, classes, runs in zip(groups, first[0::2], first[1::2], strict=True):
        ready_sets += [("zrange", (keys.group_key(g, f"c{text(c)}:{tenant}"), 0, -1)) for c in classes]
        running += [text(run).split("|", 1)[0] for run in runs]
    second = await _pipelined(redis, ready_sets + [("hget", (keys.request(rid), "sid")) for rid in running])
    sessions = {text(sid) for members in second[:len(ready_sets)] for sid in members}
    sessions |= {text(sid) for sid in second[len(ready_sets):] if sid is not None}
    queues = await _pipelined(redis, [("lrange", (keys.session_queue(sid), 0, -1)) for sid in sorted(sessions)])
    return set(running) | {text(rid) for queue in queues for rid in queue}


async def seed_active(redis: Any, tenant: str) -> int:
    """Add the tenant's live requests to its admission set (those already there keep their place);
    returns how many were added."""
    live = await live_requests(redis, tenant)
    if not live:
        return 0
    key = keys.tenant_active(tenant)
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(key, dict.fromkeys(live, now), nx=True)
        pipe.expire(key, KEEP_SECONDS)
        added, _ = await pipe.execute()
    return int(added)
