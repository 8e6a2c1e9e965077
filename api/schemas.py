"""Request bodies and their validation rules (422 with a message naming the field)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sluicegate.settings import PRIORITY_NAMES

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
SESSION_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


def parse_priority(value: Any) -> int:
    """0..9, or one of the names low=2, normal=5, high=7, critical=9."""
    if isinstance(value, bool):
        raise ValueError("priority must be 0..9 or low|normal|high|critical")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PRIORITY_NAMES:
            return PRIORITY_NAMES[text]
        if not text.isdigit():
            raise ValueError("priority must be 0..9 or low|normal|high|critical")
        value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= 9:
        raise ValueError("priority must be 0..9 or low|normal|high|critical")
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1, max_length=64)
    content: Any = ""


class SubmitBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    max_tokens: int = Field(default=256, ge=1)
    priority: int | str = 5
    tenant: str = Field(default="default", pattern=NAME_PATTERN)
    group: str = Field(default="default", pattern=NAME_PATTERN)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> int:
        return parse_priority(value)

    @model_validator(mode="after")
    def _one_input(self) -> SubmitBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class WeightBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(gt=0, le=1e6)


class QuotaBody(BaseModel):
    """Absent fields keep their value; null removes the limit (unlimited)."""

    model_config = ConfigDict(extra="forbid")
    requests_per_second: float | None = Field(default=None, gt=0)
    tokens_per_second: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=0)
    burst_tokens: float | None = Field(default=None, gt=0)


class KeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=NAME_PATTERN)


class ChatBody(BaseModel):
    """The OpenAI chat-completions body; fields Sluicegate does not use are passed to the engine."""

    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
