"""What an engine is: something that streams the tokens of a run, starting at its start index.

An engine yields, in order:
- `str`: the text of one token (the sim engine's whole output, and a backend's plain text chunks);
- `Token`: one token whose backend chunk said more than its text (a tool-call delta, logprobs);
- at most one `Finish`, last: why the backend stopped and the usage it reported. An engine that
  yields none finished because it reached `max_tokens` (finish_reason `length`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from sluicegate.sessions.runs import RunSpec


class EngineError(Exception):
    """A generation failed. `transient` errors are worth resuming elsewhere; others end the request."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class BackendDown(EngineError):
    """A run could not reach its backend before its first token (nothing listening, or not up: a 503):
    transient, and no failure of the request's (its worker withdraws its slots until its probe answers;
    workers/engines/probe.py)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


@dataclass(frozen=True, slots=True)
class Token:
    """A token with what its chunk carried besides text: `delta` is the backend's raw delta without
    `content` and `role` (e.g. `{"tool_calls": [...]}`), `logprobs` the choice's logprobs object."""

    text: str
    delta: dict[str, Any] | None = None
    logprobs: Any = None


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of a generation as the backend told it. `usage` is for the whole request (an engine
    that continued a partial output reports it as if the request had never been interrupted)."""

    reason: str
    usage: dict[str, Any] | None = None


Piece = str | Token | Finish


class Engine(Protocol):
    def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[Piece]:
        """Tokens for indices run.start_index, run.start_index + 1, ... up to max_tokens, then
        optionally a Finish.

        `so_far` is the text already generated (indices before start_index), for engines that
        continue a generation from prompt + output so far.
        """
        ...

    async def aclose(self) -> None: ...
