"""Engines: `sim` (a paced deterministic stand-in for a GPU) and `openai` (any compatible server)."""

from __future__ import annotations

from sluicegate.settings import Settings
from sluicegate.workers.engines.base import Engine


def make_engine(settings: Settings) -> Engine:
    if settings.engine == "sim":
        from sluicegate.workers.engines.sim import SimEngine

        return SimEngine(tokens_per_second=settings.sim_tokens_per_second, prefill_ms=settings.sim_prefill_ms)
    if settings.engine == "openai":
        from sluicegate.workers.engines.openai import OpenAIEngine

        return OpenAIEngine.from_settings(settings)
    raise ValueError(f"unknown engine {settings.engine!r}: use sim or openai")
