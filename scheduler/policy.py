"""The scheduling policy's parameters, published to Redis where the dispatch functions read them.

Dispatch decisions run inside atomic functions started by whoever frees or fills a slot (the API on
submit, a worker on finish, the scheduler on a timer), so the policy must live where all of them
can read it: `sg:policy`, copied into each group's control plane (`sg:{g:G}:pol`, in the group's own
slot of a cluster). The scheduler writes it from its settings when it starts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.library import policy_fields
from sluicegate.sessions.registry import copy_policy
from sluicegate.settings import Settings

__all__ = ["policy_fields", "publish_policy"]


log = logging.getLogger(__name__)


async def publish_policy(redis: Any, settings: Settings) -> list[str]:
    """Write sg:policy, then copy it into every group, each on its own: a group whose slot cannot be reached
    must not keep the scheduler from starting, nor the others from their copy (the scheduler's loop of that
    group copies it again, until it succeeds). Returns the groups whose copy failed."""
    await redis.hset(keys.POLICY, mapping=policy_fields(settings))  # type: ignore[arg-type]
    groups = sorted(text(group) for group in await redis.smembers(keys.GROUPS))
    results = await asyncio.gather(*(copy_policy(redis, group) for group in groups), return_exceptions=True)
    failed = []
    for group, result in zip(groups, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result  # a cancellation, not a failing group
            log.warning("copying the policy into group %s failed (%s); its loop copies it again", group, result)
            failed.append(group)
    return failed
