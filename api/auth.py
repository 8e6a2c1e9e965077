"""API keys: an admin key from settings, tenant keys created at runtime and stored hashed.

With auth off (the default on loopback) every caller is an admin and names its tenant in the body.
With auth on, a tenant key fixes the tenant and sees only its own sessions and requests.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import orjson
from fastapi import Request
from redis.asyncio import Redis

from sluicegate.api.errors import ApiError
from sluicegate.sessions import keys


@dataclass(frozen=True)
class Principal:
    admin: bool
    tenant: str | None = None  # set for tenant keys

    @property
    def owner(self) -> str:
        """The owner to enforce on sessions and requests ("" = any)."""
        return self.tenant or ""


OPEN = Principal(admin=True)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, redis: Redis, *, enabled: bool, admin_key: str | None) -> None:
        self.redis = redis
        self.enabled = enabled
        self.admin_key = admin_key

    async def create(self, tenant: str) -> dict[str, str]:
        key = "sg-" + secrets.token_urlsafe(24)
        key_id = "key_" + secrets.token_hex(6)
        await self.redis.hset(keys.API_KEYS, key_digest(key), orjson.dumps({"key_id": key_id, "tenant": tenant}))
        await self.redis.hset(keys.API_KEYS + ":ids", key_id, key_digest(key))
        return {"key_id": key_id, "key": key, "tenant": tenant}

    async def revoke(self, key_id: str) -> bool:
        digest = await self.redis.hget(keys.API_KEYS + ":ids", key_id)
        if digest is None:
            return False
        await self.redis.hdel(keys.API_KEYS, digest)
        await self.redis.hdel(keys.API_KEYS + ":ids", key_id)
        return True

    async def principal(self, request: Request) -> Principal:
        if not self.enabled:
            return OPEN
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`")
        if self.admin_key and hmac.compare_digest(token.encode(), self.admin_key.encode()):  # bytes: str must be ASCII
            return OPEN
        record = await self.redis.hget(keys.API_KEYS, key_digest(token))
        if record is None:
            raise ApiError(401, "unknown or revoked API key")
        return Principal(admin=False, tenant=orjson.loads(record)["tenant"])


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise ApiError(403, "this endpoint needs the admin key")
