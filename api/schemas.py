"""Request bodies and their validation rules (422 with a message naming the field)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sluicegate.scheduler.deadlines import MAX_DEADLINE_MS
from sluicegate.scheduler.quota import Quota
from sluicegate.sessions.keys import NAME_PATTERN
from sluicegate.sessions.registry import check_model_name
from sluicegate.sessions.requests import ENGINE_OWNED_PARAMS
from sluicegate.settings import PRIORITY_NAMES, NotBoolean

ROLES = ("system", "user", "assistant", "tool", "developer", "function")
DEFAULT_MAX_TOKENS = 256  # the budget of a call that gives none, unless --max-tokens-limit is lower
SESSION_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
MIN_KEY_SECONDS = 0.5  # the shortest key life (expires_at is kept to the ms: `1e-9` was a key expired at birth)
PRIORITY_DIGITS = 16  # longer is no priority: int() of a 5000-digit string refused with Python's own message


def parse_priority(value: Any) -> int:
    """0..9, or one of the names low=2, normal=5, high=7, critical=9."""
    if isinstance(value, bool):
        raise ValueError("priority must be 0..9 or low|normal|high|critical")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PRIORITY_NAMES:
            return PRIORITY_NAMES[text]
        # ASCII digits only: int() refuses "²" (which isdigit() takes) with its own message
        if len(text) > PRIORITY_DIGITS or not (text.isascii() and text.isdigit()):
            raise ValueError("priority must be 0..9 or low|normal|high|critical")
        value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= 9:
        raise ValueError("priority must be 0..9 or low|normal|high|critical")
    return value


# The integers orjson writes (the openai engine encodes each call's body with it): int64 and uint64. The store's
# json.dumps takes any, so a param past them was stored, then failed at the engine as a worker error.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
PLAIN_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")


def field_path(path: str, key: Any) -> str:
    """`path` and one step into it: `.key` (a plain key), `["key"]` (any other, escaped: a message naming it
    is itself JSON), `[i]` (a list's index)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key[:64])}]"


def not_text(value: Any) -> bool:
    """A string that is not Unicode text (a lone surrogate, which no UTF-8 encoder takes)."""
    if not isinstance(value, str) or value.isascii():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def unsendable(params: dict[str, Any], root: str = "") -> tuple[str, str] | None:
    """Where in `params` (a path from `root`: `seed`, `params.tools[0].function.name`) a value is that the
    engines' JSON encoder (orjson) refuses, and why: an integer outside 64 bits, a string or key that is not
    Unicode text (a lone surrogate). None when orjson takes them all (the usual case: one encode, no walk).
    The params the engine owns are never sent: no reason to refuse them."""
    try:
        orjson.dumps(params)
        return None
    except orjson.JSONEncodeError:
        pass
    return unsendable_value({k: v for k, v in params.items() if k not in ENGINE_OWNED_PARAMS}, root, "params")


def unsendable_value(value: Any, root: str, name: str = "") -> tuple[str, str] | None:
    """`unsendable` for any value sent to the backend (the messages, `root` "messages": `messages[0].x`): the
    integers the store's json.dumps keeps and the worker's orjson reads back as floats (`1e+23`) are refused at
    the submit, never sent changed. `name`: the value's name when orjson refuses it for no reason the walk
    finds and `root` is "" (the chat route's params, the body's own fields)."""
    text_error = "not valid Unicode text (a lone surrogate?)"
    try:
        orjson.dumps(value)
        return None
    except orjson.JSONEncodeError:
        pass
    stack: list[tuple[str, Any]] = [(root, value)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
            return path, f"an integer must fit in 64 bits ({INT_MIN} to {INT_MAX})"
        if not_text(value):
            return path, text_error
        steps = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        children = []
        for key, child in steps:
            where = field_path(path, key)
            if not_text(key):
                return where, text_error
            children.append((where, child))
        stack.extend(reversed(children))  # depth first, in the body's order
    return root or name, "cannot be encoded as JSON"


def default_max_tokens(limit: int) -> int:
    """The budget of a call that gives none: DEFAULT_MAX_TOKENS, or `--max-tokens-limit` when that is lower,
    so that lowering the limit never refuses (422) a call for a max_tokens it did not send."""
    return min(DEFAULT_MAX_TOKENS, limit)


class Message(BaseModel):
    """An OpenAI chat message, checked here so that a bad one is a 422 at the submit and never a failed
    generation later; its other fields (name, tool_calls, tool_call_id, ...) pass through to the engine."""

    model_config = ConfigDict(extra="allow")
    # Documented as the schema's enum and the content's shapes, so that a client (or a fuzzer) sees what
    # is valid; checked by the validators below, whose messages name the field.
    role: str = Field(json_schema_extra={"enum": list(ROLES)})
    content: Any = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]})

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"role {value[:64]!r} is not one of {', '.join(ROLES)}")
        return value

    @model_validator(mode="after")
    def _content(self) -> Message:
        extra = self.model_extra or {}
        if self.content is None:
            if not (self.role == "assistant" and (extra.get("tool_calls") or extra.get("function_call"))):
                raise ValueError(f"content: required for a {self.role} message (a string or a list of parts)")
        elif not isinstance(self.content, str) and not (
                isinstance(self.content, list) and all(isinstance(p, dict) for p in self.content)):
            raise ValueError("content: a string or a list of parts (objects)")
        if self.role == "tool" and not isinstance(extra.get("tool_call_id"), str):
            raise ValueError("tool_call_id: required for a tool message")
        return self


class SubmitBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    max_tokens: Annotated[int, NotBoolean] = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    priority: int | str = 5
    # A name (NAME_PATTERN), checked only where it is used (api/requests_routes.py `submit_tenant`): with a
    # tenant key the field is ignored, whatever JSON it holds (null, a number: CONTRACT.md), as the chat route
    # ignores X-Tenant. Documented as the string it must be where it is used.
    tenant: Any = Field(default="default", json_schema_extra={"type": "string", "pattern": NAME_PATTERN})
    group: str = Field(default="default", pattern=NAME_PATTERN)
    params: dict[str, Any] = Field(default_factory=dict)
    # the time-to-first-token objective
    deadline_ms: Annotated[int | None, NotBoolean] = Field(default=None, ge=1, le=MAX_DEADLINE_MS)
    on_deadline_miss: Literal["run", "fail"] = "run"
    callback_url: str | None = None  # push mode: checked against --webhook-allow (api/callbacks.py)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> int:
        return parse_priority(value)

    def budget(self, limit: int) -> int:
        """`max_tokens` as given (above `limit`: the submit's 422), else the default within `limit`."""
        return self.max_tokens if "max_tokens" in self.model_fields_set else default_max_tokens(limit)

    @model_validator(mode="after")
    def _one_input(self) -> SubmitBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class TenantBody(BaseModel):
    """`PUT /v1/admin/tenants/{t}`: a field left out is kept; `max_priority`, `max_queued` or `max_streams`
    given as null goes back to its default (9; unlimited). The weight cannot be null (it is always some
    weight)."""

    model_config = ConfigDict(extra="forbid")
    # at least 1e-6: a tenant's fairness counter grows by its tokens over its weight, and a weight near
    # zero (1e-320) would make it infinite for good, even after the weight is set right
    weight: Annotated[float | None, NotBoolean] = Field(default=None, ge=1e-6, le=1e6)
    max_priority: int | None = Field(default=None, ge=0, le=9)
    max_queued: Annotated[int | None, NotBoolean] = Field(default=None, ge=0, le=1_000_000)
    max_streams: Annotated[int | None, NotBoolean] = Field(default=None, ge=0, le=1_000_000)

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float | None) -> float:
        if value is None:
            raise ValueError("a number from 1e-6 to 1e6 (leave the field out to keep the weight)")
        return value

    @field_validator("max_priority", mode="before")
    @classmethod
    def _max_priority(cls, value: Any) -> int | None:
        return None if value is None else parse_priority(value)  # 0..9 or a name, as a submit takes it

    @model_validator(mode="after")
    def _something(self) -> TenantBody:
        if not self.model_fields_set:
            raise ValueError("give at least one of weight, max_priority, max_queued, max_streams")
        return self


QuotaBody = Quota  # the quota fields of PUT /v1/admin/groups/{g} (scheduler/quota.py)


class GroupBody(QuotaBody):
    """The quota fields, and the model the group serves (absent: kept; null: the group names none)."""

    model: str | None = None
    # default deadline per priority class ("0".."9" or a name) in ms; null removes a class's default
    deadlines_ms: dict[str, int | None] | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name(value)

    @field_validator("deadlines_ms", mode="before")
    @classmethod
    def _deadlines_not_boolean(cls, value: Any) -> Any:
        """`true` would be taken as a deadline of 1 ms (pydantic's lax mode)."""
        for name, ms in value.items() if isinstance(value, dict) else ():
            if isinstance(ms, bool):
                raise ValueError(f"{name}: a deadline in ms, 1..{MAX_DEADLINE_MS}, or null (not a boolean)")
        return value

    @field_validator("deadlines_ms")
    @classmethod
    def _deadlines(cls, value: dict[str, int | None] | None) -> dict[str, int | None]:
        if value is None:
            raise ValueError("an object of class -> ms (leave the field out to keep them)")
        checked: dict[str, int | None] = {}
        for name, ms in value.items():
            if ms is not None and not 1 <= ms <= MAX_DEADLINE_MS:
                raise ValueError(f"{name}: a deadline in ms, 1..{MAX_DEADLINE_MS}, or null")
            checked[str(parse_priority(name))] = ms
        return checked


class KeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=NAME_PATTERN)
    # seconds; none: never expires. At least MIN_KEY_SECONDS: `1e-9` made a key expired before its first use.
    expires_in: Annotated[float | None, NotBoolean] = Field(default=None, ge=MIN_KEY_SECONDS, le=10 * 365 * 86400)


class ChatBody(BaseModel):
    """The OpenAI chat-completions body; fields Sluicegate does not use are passed to the engine."""

    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: Annotated[int | None, NotBoolean] = Field(default=None, ge=1)
    max_completion_tokens: Annotated[int | None, NotBoolean] = Field(default=None, ge=1)
    stream: bool | None = False  # OpenAI's schema allows null: the default (False)
