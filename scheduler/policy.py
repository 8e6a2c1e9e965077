"""The scheduling policy's parameters, published to Redis where the dispatch script reads them.

Dispatch decisions run inside atomic scripts started by whoever frees or fills a slot (the API on
submit, a worker on finish, the scheduler on a timer), so the policy must live where all of them
can read it: the `sg:policy` hash. The scheduler writes it from its settings when it starts.
"""

from __future__ import annotations

from redis.asyncio import Redis

from sessions import keys
from sluicegate.settings import Settings


def policy_fields(settings: Settings) -> dict[str, float]:
    fields: dict[str, float] = {
        "w_in": settings.input_token_weight,
        "w_out": settings.output_token_weight,
        "est": settings.output_estimate_ratio,
        "min_run": settings.preempt_min_run_ms,
        "max_pre": settings.max_preemptions,
    }
    for cls, seconds in settings.class_max_waits().items():
        fields[f"mw{cls}"] = seconds
    return fields


async def publish_policy(redis: Redis, settings: Settings) -> None:
    await redis.hset(keys.POLICY, mapping=policy_fields(settings))  # type: ignore[arg-type]
