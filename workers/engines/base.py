"""What an engine is: something that streams the tokens of a run, starting at its start index."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from sluicegate.sessions.runs import RunSpec


class EngineError(Exception):
    """A generation failed. `transient` errors are worth resuming elsewhere; others end the request."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class Engine(Protocol):
    def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[str]:
        """Token texts for indices run.start_index, run.start_index + 1, ... up to max_tokens.

        `so_far` is the text already generated (indices before start_index), for engines that
        continue a generation from prompt + output so far.
        """
        ...

    async def aclose(self) -> None: ...
