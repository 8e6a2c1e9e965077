"""Which group a chat call's `model` names, as this API process sees the registry (sessions/store.py),
and each group's default deadlines (scheduler/deadlines.py), both read on a request's way.

The registry changes rarely and every chat call reads it, so a snapshot is kept for `ttl` seconds: a
known model costs no round trip. A name the snapshot does not know reloads it when it is older than
`miss_ttl`, so a model declared a moment ago works within about a second, and a flood of unknown
names costs at most one read per `miss_ttl`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from sluicegate.scheduler.deadlines import read_deadlines
from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.registry import DEFAULT_GROUP


class Directory:
    def __init__(self, redis: Any, *, ttl: float = 5.0, miss_ttl: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.ttl = ttl
        self.miss_ttl = miss_ttl
        self.clock = clock
        self.models: dict[str, str] = {}  # model -> group
        self.groups: frozenset[str] = frozenset()
        self.loaded_at = -math.inf
        self.served: tuple[float, list[dict[str, Any]]] | None = None  # GET /v1/models: (when, listing)
        self._lock = asyncio.Lock()  # one reload at a time; the callers waiting on it share its result
        self.deadlines: dict[str, tuple[float, dict[int, int]]] = {}  # group -> (read at, class -> ms)

    async def group_for(self, model: str) -> str | None:
        """The group serving `model`, else the group of that name; None when there is neither."""
        return await self._found(lambda: self.models.get(model) or self._group_named(model))

    async def deadline_for(self, group: str, priority: int) -> int | None:
        """The group's default deadline (ms) for a submit of this class that names none, if any; read
        at most every `ttl` seconds per group. A group the registry does not know has none, and is not
        remembered: its submit is a 404, and names made up by a caller must not grow this cache."""
        hit = self.deadlines.get(group)
        now = self.clock()
        if hit is None or now - hit[0] > self.ttl:
            if await self._found(lambda: self._group_named(group)) is None:
                self.deadlines.pop(group, None)
                return None
            hit = (now, await read_deadlines(self.redis, group))
            self.deadlines[group] = hit
        return hit[1].get(priority)

    async def _found(self, find: Callable[[], str | None]) -> str | None:
        """`find` in the snapshot; a miss reloads it when it is older than `miss_ttl`, and looks again."""
        for max_age in (self.ttl, self.miss_ttl):
            await self._fresh(max_age)
            found = find()
            if found is not None:
                return found
        return None

    def invalidate(self) -> None:
        """Forget the snapshots (this process changed the registry or a group's deadlines): the next
        lookup reloads them."""
        self.loaded_at = -math.inf
        self.served = None
        self.deadlines.clear()

    def _group_named(self, name: str) -> str | None:
        return name if name == DEFAULT_GROUP or name in self.groups else None

    async def _fresh(self, max_age: float) -> None:
        if self.clock() - self.loaded_at <= max_age:
            return
        async with self._lock:
            if self.clock() - self.loaded_at <= max_age:  # reloaded while this caller waited
                return
            began = self.clock()
            models = await self.redis.hgetall(keys.MODELS)
            groups = await self.redis.smembers(keys.GROUPS)
            self.models = {text(m): text(g) for m, g in models.items()}
            self.groups = frozenset(text(g) for g in groups)
            self.loaded_at = began
