"""The scheduling policy's parameters, published to Redis where the dispatch functions read them.

Dispatch decisions run inside atomic functions started by whoever frees or fills a slot (the API on
submit, a worker on finish, the scheduler on a timer), so the policy must live where all of them
can read it: `sg:policy`, copied into each group's control plane (`sg:{g:G}:pol`, in the group's own
slot of a cluster). The scheduler writes it from its settings when it starts.
"""

from __future__ import annotations

from typing import Any

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.library import policy_fields
from sluicegate.sessions.registry import copy_policy
from sluicegate.settings import Settings

__all__ = ["policy_fields", "publish_policy"]


async def publish_policy(redis: Any, settings: Settings) -> None:
    await redis.hset(keys.POLICY, mapping=policy_fields(settings))  # type: ignore[arg-type]
    for group in await redis.smembers(keys.GROUPS):
        await copy_policy(redis, text(group))
