"""A group's default deadline per priority class (`PUT /v1/admin/groups/{g} {"deadlines_ms": {"7": 500}}`).

One hash per group in its control plane (sessions/keys.py `group_key(g, "dls")`): class -> the
time-to-first-token objective in ms given to a submit of that class that names none. The API applies
it at the submit (api/directory.py caches it), so the request carries its deadline like one given
explicitly and both planes see the same one.
"""

from __future__ import annotations

from typing import Any

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text

MAX_DEADLINE_MS = 86_400_000  # a day: past that an objective means nothing to a scheduler


async def read_deadlines(redis: Any, group: str) -> dict[int, int]:
    raw = await redis.hgetall(keys.group_key(group, "dls"))
    return {int(text(cls)): int(text(ms)) for cls, ms in raw.items()}


async def write_deadlines(redis: Any, group: str, changes: dict[int, int | None]) -> dict[int, int]:
    """Set the given classes' defaults; a class given None has none again."""
    key = keys.group_key(group, "dls")
    to_set = {str(cls): ms for cls, ms in changes.items() if ms is not None}
    to_clear = [str(cls) for cls, ms in changes.items() if ms is None]
    if to_set:
        await redis.hset(key, mapping=to_set)
    if to_clear:
        await redis.hdel(key, *to_clear)
    return await read_deadlines(redis, group)
