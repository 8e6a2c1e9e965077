"""A request's events as OpenAI chat-completion objects: what the backend said, passed through.

- token events become chunks (stream) or the message (not streamed): the text, and the raw non-text
  delta the event carries (`delta.tool_calls`, ...) and its `logprobs`. Streamed, the deltas go out
  as the backend sent them; not streamed, tool-call deltas are reassembled by their `index` (id,
  type and name from the first, `function.arguments` concatenated) and logprobs concatenated.
- `done` gives the finish_reason and the usage (the backend's when it reported one, else the input
  estimate and the tokens streamed).

A plain text token (most of them) takes a byte-assembled path: no per-token JSON encoding.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from sluicegate.sessions.requests import NewRequest

CHUNK_TAIL = b'},"finish_reason":null}]}\n\n'
DONE = b"data: [DONE]\n\n"


def merge_tool_calls(calls: dict[int, dict[str, Any]], deltas: list[Any]) -> None:
    """Fold streamed tool-call deltas into whole calls, by index. A backend's delta is taken as it comes: an
    index that is no integer (some servers send null) is the next call's, a `function` that is no object
    adds nothing (the streamed answer passes them on as they are)."""
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = len(calls)
        call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        merge_function(call["function"], delta.get("function"))


def merge_function(whole: dict[str, Any], piece: Any) -> None:
    """One streamed piece of a function call (`name`, `arguments`) added to the call so far."""
    if not isinstance(piece, dict):
        return
    for field in ("name", "arguments"):
        if isinstance(piece.get(field), str):
            whole[field] = whole.get(field, "") + piece[field]


class Completion:
    """Renders one request's events as OpenAI objects."""

    def __init__(self, new: NewRequest, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{new.request_id}"
        self.model = model
        self.created = int(time.time())
        self.prompt_tokens = new.input_tokens
        self.include_usage = include_usage
        self.tokens = 0
        # not streamed: the message being assembled
        self.texts: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.other: dict[str, Any] = {}  # other delta fields (e.g. reasoning_content), strings concatenated
        self.logprobs: list[Any] | None = None
        prefix = (b'data: {"id":"' + self.id.encode() + b'","object":"chat.completion.chunk","created":'
                  + str(self.created).encode() + b',"model":' + orjson.dumps(model) + b',"choices":[{"index":0,')
        self.first_head = prefix + b'"delta":{"role":"assistant","content":'
        self.head = prefix + b'"delta":{"content":'

    def _base(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _usage(self, data: dict[str, Any]) -> dict[str, Any]:
        usage = data.get("usage")
        if isinstance(usage, dict):
            return usage
        tokens = int(data.get("tokens", self.tokens))
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens,
                "total_tokens": self.prompt_tokens + tokens}

    # ---- streamed ----------------------------------------------------------------------------
    def chunk(self, data: dict[str, Any]) -> bytes:
        """One token event's chunk."""
        first = self.tokens == 0
        self.tokens += 1
        text = str(data.get("text", ""))
        if "delta" not in data and "logprobs" not in data:
            return (self.first_head if first else self.head) + orjson.dumps(text) + CHUNK_TAIL
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        delta["content"] = text or None
        delta.update(data.get("delta") or {})
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        if data.get("logprobs") is not None:
            choice["logprobs"] = data["logprobs"]
        return b"data: " + orjson.dumps({**self._base(), "choices": [choice]}) + b"\n\n"

    def final_chunks(self, data: dict[str, Any]) -> bytes:
        """The finish chunk (and the usage's own chunk, with `include_usage`), then `[DONE]`. An answer
        with no token still opens with the role's chunk, as OpenAI's streams always do: the SDK's stream
        helper builds its message's role from it."""
        final: dict[str, Any] = {**self._base(), "choices": [
            {"index": 0, "delta": {}, "finish_reason": data.get("finish_reason") or "stop"}]}
        if not self.include_usage:
            final["usage"] = self._usage(data)
        out = b"data: " + orjson.dumps(final) + b"\n\n"
        if self.tokens == 0:
            out = self.first_head + b'""' + CHUNK_TAIL + out
        if self.include_usage:
            out += b"data: " + orjson.dumps({**self._base(), "choices": [], "usage": self._usage(data)}) + b"\n\n"
        return out + DONE

    # ---- not streamed ------------------------------------------------------------------------
    def add(self, data: dict[str, Any]) -> None:
        """One token event into the message being assembled."""
        self.tokens += 1
        text = data.get("text")
        if text:
            self.texts.append(str(text))
        for key, value in (data.get("delta") or {}).items():
            if key == "tool_calls" and isinstance(value, list):
                merge_tool_calls(self.tool_calls, value)
            elif key == "function_call" and isinstance(value, dict):  # the legacy field: one call, in pieces
                merge_function(self.other.setdefault(key, {"name": "", "arguments": ""}), value)
            elif isinstance(value, str) and isinstance(self.other.get(key, ""), str):
                self.other[key] = self.other.get(key, "") + value
            else:
                self.other[key] = value
        logprobs = data.get("logprobs")
        if isinstance(logprobs, dict):
            self.logprobs = (self.logprobs or []) + list(logprobs.get("content") or [])

    def message(self, data: dict[str, Any]) -> dict[str, Any]:
        text = "".join(self.texts)
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if self.tool_calls else "")}
        message.update(self.other)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": data.get("finish_reason") or "stop"}
        if self.logprobs is not None:
            choice["logprobs"] = {"content": self.logprobs}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self._usage(data)}
