"""Garbage collection for a long-running asyncio service: the objects of its start-up frozen, and young
collections rarer.

CPython's defaults (a young collection every 700 allocations net of frees, and full collections that
walk every tracked object, start-up included: modules, FastAPI's routes, pydantic's schemas) suit short
scripts. A service allocating per token and per request runs thousands of young collections a second
and, now and then, a full one that stalls every stream of the process for milliseconds: the tail of
its latency. Frozen, the start-up objects are never walked again; a higher young threshold trades a
little memory (garbage cycles live a few thousand allocations longer) for far fewer collections.
Reference counting still frees everything without a cycle at once."""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # allocations net of frees between two young collections (CPython: 700)


def settle_after_start_up() -> None:
    """Call once start-up is done (imports, settings, the app or the service object built): collect what
    it left, freeze the rest, raise the threshold. What the service builds later is collected as usual."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
