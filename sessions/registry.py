"""The registry of groups and the models they serve: which group a chat call's `model` names.

Two global keys, written by operators (`PUT /v1/admin/groups/{g}`, `serve --config`) and by workers
(their `--backend-model`): `sg:groups` (every declared or served group; the scheduler sweeps each)
and `sg:models` (model -> group). A group serves at most one model, and a model belongs to one group.
A model may be another group's name: a chat call's `model` routes to the group serving it first, and
`/v1/models` then does not list that group by its name (api/models_routes.py), which `X-Group` still reaches.
Callers never create groups: a submit to a group that is neither declared nor served is refused.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from sluicegate.sessions import keys
from sluicegate.sessions.connect import text
from sluicegate.sessions.scripts import Scripts

DEFAULT_GROUP = "default"  # always exists: where a request naming no group goes
MODEL_NAME = re.compile(r"[^\s\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,256}")  # no lone surrogate: not UTF-8
DECLARE_SCRIPT = Path(__file__).parent / "lua" / "standalone" / "declare_model.lua"


class ModelConflict(ValueError):
    """The model is already served by another group (`group`)."""

    def __init__(self, model: str, group: str) -> None:
        super().__init__(f"model {model!r} is served by group {group!r}")
        self.model = model
        self.group = group


def check_model_name(model: str) -> str:
    """1-256 characters, none of them whitespace or control (`meta-llama/Llama-3.1-8B-Instruct`,
    `qwen2.5:7b`): a model name is echoed in responses and listed by /v1/models."""
    if not MODEL_NAME.fullmatch(model):
        raise ValueError("a model name is 1-256 characters, none of them whitespace or control characters")
    return model


@cache
def _declare_source() -> str:
    return DECLARE_SCRIPT.read_text()


async def declare_group(redis: Any, group: str, model: str | None = None, *, replace: bool = True) -> str | None:
    """Register the group and, when `model` is given, make it the group's one model: replacing the model
    it named before, or (`replace=False`, a worker's --backend-model) only when it names none yet.
    ModelConflict when another group serves that model (nothing is written then).
    Returns the model the group serves afterwards (None when it names none)."""
    if model is not None:
        check_model_name(model)
        conflict = await model_conflict(redis, group, model)
        if conflict is not None:
            raise conflict
    await register_group(redis, group)
    if model is None:
        return (await group_models(redis)).get(group)
    reply = await redis.eval(_declare_source(), 1, keys.MODELS, model, group, "replace" if replace else "if_none")
    if isinstance(reply, list):  # if_none, and the group names another model already
        return text(reply[1])
    if reply is not None:
        raise ModelConflict(model, text(reply))
    return model


async def model_conflict(redis: Any, group: str, model: str, released: Collection[str] = ()) -> ModelConflict | None:
    """Why `group` cannot take `model`, if it cannot: another group serves it (unless that group is one of
    `released`, about to let go of it). Not that it is another group's name: `sg:groups` only grows (a
    worker once started with `--group llama` registers it for good), so such a rule would block a model
    name for ever over a group long gone; /v1/models leaves a shadowed group's name out instead."""
    owner = await redis.hget(keys.MODELS, model)
    holder = None if owner is None else text(owner)
    if holder == group:
        return None
    if holder is not None and holder not in released:
        return ModelConflict(model, holder)
    return None


async def forget_group_model(redis: Any, group: str) -> None:
    """The group names no model any more (it stays a group)."""
    stale = [m for m, g in (await redis.hgetall(keys.MODELS)).items() if text(g) == group]
    if stale:
        await redis.hdel(keys.MODELS, *stale)


async def group_models(redis: Any) -> dict[str, str]:
    """group -> the model it serves, for the groups that name one."""
    return {text(g): text(m) for m, g in (await redis.hgetall(keys.MODELS)).items()}


async def group_of_model(redis: Any, model: str) -> str | None:
    group = await redis.hget(keys.MODELS, model)
    return None if group is None else text(group)


async def group_exists(redis: Any, group: str) -> bool:
    """Declared (by an operator) or served (a worker registered it); `default` always exists."""
    return group == DEFAULT_GROUP or bool(await redis.sismember(keys.GROUPS, group))


async def register_group(redis: Any, group: str) -> None:
    """Make a group known: in the registry, and with its copies of the policy and tenant weights
    (decisions read those from the group's own slot). Once per group and process; idempotent."""
    if await redis.sadd(keys.GROUPS, group):
        await copy_policy(redis, group)
        # Submits dispatch by themselves, but the group's timed steps (a preemption quantum's end, a quota
        # refill, aging) wait for its scheduler loop: a scheduler starts it now, not on its next refresh.
        await redis.lpush(keys.GROUPS_HINT, group)
        await redis.ltrim(keys.GROUPS_HINT, 0, 63)


COPY_ROUNDS = 8  # copies of a source that keeps changing under them; each change also copies itself
WEIGHTS_PER_CALL = 256  # tenants whose copy one set_weight call rewrites: a call blocks the group's shard


async def copy_policy(redis: Any, group: str) -> None:
    """Copy sg:policy and sg:tenants into the group's control plane. A change written to a source between
    this read and its write (an operator's PUT while a scheduler starts) would be overwritten in the copy
    by the value before it, which decisions would then use for good: the sources are read again after
    the write, and copied again until they read as written (a change writes its source first).
    A weight whose copy differs (a PUT that failed before it reached this group) is written by set_weight.lua,
    as a PUT writes it: with the tenant's share of the running slots rescored, or fair-share preemption
    would rank the tenant by the old weight until its next run starts or stops."""
    for _ in range(COPY_ROUNDS):
        policy = await redis.hgetall(keys.POLICY)
        weights = await redis.hgetall(keys.TENANT_WEIGHTS)
        if policy:
            await redis.hset(keys.group_key(group, "pol"), mapping=policy)
        await _copy_weights(redis, group, weights)
        if await redis.hgetall(keys.POLICY) == policy and await redis.hgetall(keys.TENANT_WEIGHTS) == weights:
            return


async def _copy_weights(redis: Any, group: str, weights: dict[Any, Any]) -> None:
    copy = await redis.hgetall(keys.group_key(group, "tw"))
    changed = [item for tenant, weight in weights.items() if copy.get(tenant) != weight for item in (tenant, weight)]
    scripts = Scripts(redis, single_server=not isinstance(redis, AsyncRedisCluster))
    for start in range(0, len(changed), 2 * WEIGHTS_PER_CALL):
        await scripts.call("set_weight", [keys.group_prefix(group)], changed[start:start + 2 * WEIGHTS_PER_CALL])
