"""A group's quota as operators give it (`PUT /v1/admin/groups/{g}`, a `[groups.NAME]` table): its
fields and their rules, in one place. The dispatch script reads the same names (quotas.lua)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Quota(BaseModel):
    """Absent fields keep their value; null removes the limit (unlimited)."""

    model_config = ConfigDict(extra="forbid")
    requests_per_second: float | None = Field(default=None, gt=0)
    tokens_per_second: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=0)
    burst_tokens: float | None = Field(default=None, gt=0)


QUOTA_FIELDS = tuple(Quota.model_fields)
