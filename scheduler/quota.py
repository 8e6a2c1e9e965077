"""A group's quota as operators give it (`PUT /v1/admin/groups/{g}`, a `[groups.NAME]` table): its
fields and their rules, in one place. The dispatch script reads the same names (quotas.lua)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from sluicegate.settings import NotBoolean

MIN_RATE = 1e-6  # per second; quotas.lua reads a rate stored before this floor at it


class Quota(BaseModel):
    """Absent fields keep their value; null removes the limit (unlimited) of a rate or `max_concurrency`, and
    puts a burst back to its default (quotas.lua: `burst` 1 request, `burst_tokens` one second of tokens/s)."""

    # Finite and bounded: the scripts hold these as doubles, and a value past 2**64 stored once made every
    # later read of the group's quota (GET /v1/admin/groups) fail to render, a 500 until it was removed.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # At least one a million seconds: a rate of 1e-320 made the interval (1000 / rate) infinite, and the
    # scripts' arithmetic on it NaN, which admits everything (and stayed stored after a sane rate).
    requests_per_second: Annotated[float | None, NotBoolean] = Field(default=None, ge=MIN_RATE, le=1e9)
    tokens_per_second: Annotated[float | None, NotBoolean] = Field(default=None, ge=MIN_RATE, le=1e12)
    burst: Annotated[int | None, NotBoolean] = Field(default=None, ge=1, le=10**9)
    max_concurrency: Annotated[int | None, NotBoolean] = Field(default=None, ge=0, le=10**6)
    burst_tokens: Annotated[float | None, NotBoolean] = Field(default=None, gt=0, le=1e12)


QUOTA_FIELDS = tuple(Quota.model_fields)
