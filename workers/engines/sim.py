"""The sim engine: deterministic text for a prompt, exactly max_tokens tokens, at a fixed pace.

It stands in for a GPU in tests and benchmarks. `sim_token` is shared with `sluicegate
sim-backend`, so the openai engine in front of the sim-backend yields the very same text.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from sluicegate.sessions.runs import RunSpec

WORDS = ("the", "a", "gate", "river", "token", "flows", "under", "bright", "queue", "of", "stone", "light",
         "and", "slow", "water", "runs", "to", "sea", "over", "night", "mill", "wheel", "turns", "keeps",
         "time", "with", "every", "drop", "held", "back", "until", "its", "turn")


def prompt_seed(prompt: str) -> bytes:
    return hashlib.blake2b(prompt.encode(), digest_size=8).digest()


def sim_token(seed: bytes, index: int) -> str:
    """Token `index` of the sim output for a prompt seed: a word and a space."""
    digest = hashlib.blake2b(index.to_bytes(4, "little"), key=seed, digest_size=4).digest()
    return WORDS[int.from_bytes(digest, "little") % len(WORDS)] + " "


def sim_text(prompt: str, count: int) -> str:
    seed = prompt_seed(prompt)
    return "".join(sim_token(seed, i) for i in range(count))


def prompt_of(messages: list[dict[str, object]]) -> str:
    """The text the sim output depends on: the contents of all messages, in order."""
    return "\n".join(str(m.get("content", "")) for m in messages)


async def paced_tokens(seed: bytes, start: int, stop: int, *, tokens_per_second: float,
                       prefill_ms: float) -> AsyncIterator[str]:
    """Tokens start..stop-1: the first after the prefill delay, then one every 1/tokens_per_second."""
    loop = asyncio.get_running_loop()
    if prefill_ms > 0:  # the whole delay: a timer may fire early (uvloop's are whole milliseconds)
        until = loop.time() + prefill_ms / 1000
        while (left := until - loop.time()) > 0:
            await asyncio.sleep(left)
    began = loop.time()
    interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
    for k, index in enumerate(range(start, stop)):
        delay = began + k * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield sim_token(seed, index)


class SimEngine:
    resume_mode = "continue"  # it generates from any index: a resume continues exactly

    def __init__(self, *, tokens_per_second: float, prefill_ms: float) -> None:
        self.tokens_per_second = tokens_per_second
        self.prefill_ms = prefill_ms

    def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[str]:
        prompt = run.prompt if run.prompt is not None else prompt_of(run.messages)
        return paced_tokens(prompt_seed(prompt), run.start_index, run.max_tokens,
                            tokens_per_second=self.tokens_per_second, prefill_ms=self.prefill_ms)

    async def aclose(self) -> None:
        return None
