"""What a new request is, before it is stored."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sluicegate.sessions import keys
from sluicegate.tracing import TRACE_PARAM

# Arrays/objects nested in params or in messages: about what the chat route's parser takes (pydantic's, 200 levels
# in the whole body), far fewer than json.dumps takes on the API's stack (about 950) or the submit's parsers
# (FastAPI's json.loads about 960, the hot path's orjson 1024): every path refuses the same bodies, never a 5xx.
MAX_NESTING = 200
# The estimate of a content part that is not text (an image, audio, a file): a flat amount, not its size. 85 is
# what OpenAI counts for an image at `"detail": "low"`; the other kinds get the same (their real cost depends
# on the model and the backend, which reports it when it reports usage).
PART_TOKENS = 85
# Params an engine owns or strips (workers/engines/openai.py): never sent to a backend as given, so a value in one
# that no backend call could carry is no reason to refuse the request (api/schemas.py `unsendable`).
# `n_predict`: llama.cpp's server reads it before `max_tokens`, so a tenant's would override the budget (its limit,
# the token quota's estimate, a continuation's remaining tokens): Sluicegate's `max_tokens` is the one budget.
ENGINE_OWNED_PARAMS = frozenset({"model", "messages", "stream", "stream_options", "max_tokens",
                                 "max_completion_tokens", "n", "priority", "continue_final_message",
                                 "add_generation_prompt", "n_predict", TRACE_PARAM})


class TooDeep(ValueError):
    """Params or messages nested deeper than MAX_NESTING arrays/objects."""


def new_request_id(session_id: str) -> str:
    """The session's bucket (2 characters: the request is found from its id alone, sessions/keys.py),
    then 12 URL-safe characters (72 random bits): short, because it is repeated in every event."""
    return keys.bucket_of_session(session_id) + secrets.token_urlsafe(9)


def nested_deeper(value: Any, limit: int) -> bool:
    """Whether `value` nests more than `limit` arrays/objects, walked a level at a time (no recursion)."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, (dict, list))]
        if not level:
            return False
    return bool(level)


def json_text(value: Any, *, ensure_ascii: bool = True) -> str:
    """`value` as stored and sent to engines: ValueError for NaN or Infinity (JSON lacks them), TooDeep past
    MAX_NESTING. The nesting is walked only when the text holds more brackets than that (a long conversation)."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=False)
    except RecursionError:  # out of stack, far past MAX_NESTING
        raise TooDeep from None
    if text.count("[") + text.count("{") > MAX_NESTING and nested_deeper(value, MAX_NESTING):
        raise TooDeep
    return text


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters per token), enough for fair-share accounting."""
    return max(1, len(text) // 4)


def estimate_message_tokens(messages: list[dict[str, Any]]) -> int:
    """`estimate_tokens` of what a model reads of the messages (message_texts): PART_TOKENS per part that is not
    text. Lengths summed, no text joined or encoded: it runs on every submit's way."""
    chars = parts = 0
    for text in message_texts(messages):
        if text is None:
            parts += 1
        else:
            chars += len(text)
    return max(1, chars // 4 + parts * PART_TOKENS)


def message_texts(messages: list[dict[str, Any]]) -> Iterator[str | None]:
    """What a model reads of the messages, a piece at a time: string contents, the text of `text` parts, and the
    `name` and `arguments` of tool calls (an assistant turn whose content is None); None for each other part (an
    image, audio, a file), never its JSON, whose base64 would count tens of thousands of tokens. One walk for the
    submit's estimate and for a worker's count with its backend's tokenizer (workers/engines/openai.py)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    text = part.get("text")
                    if isinstance(text, str):
                        yield text
                else:
                    yield None
        elif content is not None:
            yield str(content)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    yield from function_texts(call.get("function"))
        if "function_call" in message:  # the legacy single call
            yield from function_texts(message["function_call"])


def function_texts(function: Any) -> Iterator[str]:
    """A tool call's `name` and `arguments` (a function object; anything else: nothing)."""
    if isinstance(function, dict):
        for value in (function.get("name"), function.get("arguments")):
            if isinstance(value, str):
                yield value


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
        ValueError for NaN or Infinity in the messages, which JSON lacks (the worker could not read them back);
        TooDeep past MAX_NESTING."""
        if self.messages is None:
            return self.prompt or ""
        return json_text(self.messages, ensure_ascii=False)

    @cached_property
    def params_json(self) -> str:
        """The params as stored and sent to engines; ValueError for NaN or Infinity, which JSON lacks; TooDeep
        past MAX_NESTING."""
        return json_text(self.params) if self.params else "{}"

    @cached_property
    def input_tokens(self) -> int:
        """The input's tokens, estimated (the charge at dispatch, and the usage when the backend reports none)."""
        if self.messages is None:
            return estimate_tokens(self.prompt or "")
        return estimate_message_tokens(self.messages)
