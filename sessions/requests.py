"""What a new request is, before it is stored."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sluicegate.sessions import keys


def new_request_id(session_id: str) -> str:
    """The session's bucket (2 characters: the request is found from its id alone, sessions/keys.py),
    then 12 URL-safe characters (72 random bits): short, because it is repeated in every event."""
    return keys.bucket_of_session(session_id) + secrets.token_urlsafe(9)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters per token), enough for fair-share accounting."""
    return max(1, len(text) // 4)


@dataclass(frozen=True)
class NewRequest:
    session_id: str
    max_tokens: int
    priority: int
    tenant: str
    group: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""  # default: a new id in the session's bucket
    deadline_ms: int | None = None  # time-to-first-token objective from the submit
    fail_on_deadline_miss: bool = False  # `"on_deadline_miss": "fail"`: end it once the deadline passes
    boost_cap: int | None = None  # the highest class a deadline may raise it to (its tenant's max_priority)

    def __post_init__(self) -> None:
        if not self.request_id:
            object.__setattr__(self, "request_id", new_request_id(self.session_id))

    @property
    def input_kind(self) -> str:
        return "p" if self.messages is None else "m"

    @cached_property
    def input_text(self) -> str:
        """Made once per request object: the submit checks it, then stores it (on every first token's way).
        ValueError for NaN or Infinity in the messages, which JSON lacks (the worker could not read them back)."""
        if self.messages is None:
            return self.prompt or ""
        return json.dumps(self.messages, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @cached_property
    def params_json(self) -> str:
        """The params as stored and sent to engines; ValueError for NaN or Infinity, which JSON lacks."""
        return json.dumps(self.params, separators=(",", ":"), allow_nan=False) if self.params else "{}"

    @property
    def input_tokens(self) -> int:
        if self.messages is None:
            return estimate_tokens(self.prompt or "")
        return estimate_tokens("".join(str(m.get("content", "")) for m in self.messages))
