"""API keys: an admin key from settings, tenant keys created at runtime and stored hashed.

With auth off (the default on loopback) every caller is an admin and names its tenant in the body.
With auth on, a tenant key fixes the tenant and sees only its own sessions and requests.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

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
# `last_used_at` is written at most this often per key and API process: a key's use costs no write
# per request, and the listing is still accurate to about a minute.
TOUCH_SECONDS = 60.0


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, redis: Redis, *, enabled: bool, admin_key: str | None) -> None:
        self.redis = redis
        self.enabled = enabled
        self.admin_key = admin_key
        self.touched: dict[str, float] = {}  # key_id -> when this process last wrote its last_used_at (monotonic)

    async def create(self, tenant: str, expires_in: float | None = None) -> dict[str, Any]:
        """A new key, shown once; only its digest is stored. `expires_in` (seconds) bounds its life."""
        key = "sg-" + secrets.token_urlsafe(24)
        key_id = "key_" + secrets.token_hex(6)
        now = round(time.time(), 3)
        expires_at = None if expires_in is None else round(now + expires_in, 3)
        record = {"key_id": key_id, "tenant": tenant, "created_at": now, "expires_at": expires_at}
        await self.redis.hset(keys.API_KEYS, key_digest(key), orjson.dumps(record))
        await self.redis.hset(keys.API_KEY_IDS, key_id, key_digest(key))
        return {**record, "key": key}

    async def require_metrics_reader(self, request: Request, metrics_key: str | None) -> None:
        """With auth on, /metrics tells queue depths and tenants' traffic: it needs the admin key or the
        metrics key (a scraper's, good for nothing else)."""
        if not self.enabled:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if metrics_key and scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), metrics_key.encode()):
            return
        if not (await self.principal(request)).admin:
            raise ApiError(403, "/metrics needs the admin key or --metrics-key")

    async def revoke(self, key_id: str) -> bool:
        digest = await self.redis.hget(keys.API_KEY_IDS, key_id)
        if digest is None:
            return False
        await self.redis.hdel(keys.API_KEYS, digest)
        await self.redis.hdel(keys.API_KEY_IDS, key_id)
        await self.redis.hdel(keys.API_KEYS_USED, key_id)
        self.touched.pop(key_id, None)
        return True

    async def listing(self) -> list[dict[str, Any]]:
        """Every key's metadata, oldest first: never the key nor its digest (the digest of a short or
        guessable key would let a reader confirm it offline). Keys made before `created_at` was kept
        show null there."""
        records = await self.redis.hvals(keys.API_KEYS)
        used = await self.redis.hgetall(keys.API_KEYS_USED)
        last_used = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in used.items()}
        now = time.time()
        out = []
        for raw in records:
            record = orjson.loads(raw)
            expires_at = record.get("expires_at")
            out.append({"key_id": record["key_id"], "tenant": record["tenant"],
                        "created_at": record.get("created_at"), "last_used_at": last_used.get(record["key_id"]),
                        "expires_at": expires_at, "expired": expires_at is not None and now >= expires_at})
        return sorted(out, key=lambda k: (k["created_at"] or 0, k["key_id"]))

    async def accept(self, raw: bytes | str) -> Principal:
        """A stored key's principal: 401 once it expired; notes its use (throttled, see TOUCH_SECONDS)."""
        record = orjson.loads(raw)
        now = time.time()
        expires_at = record.get("expires_at")
        if expires_at is not None and now >= expires_at:
            raise ApiError(401, f"API key {record['key_id']} expired; ask the operator for a new one")
        key_id = record["key_id"]
        at = time.monotonic()
        if at - self.touched.get(key_id, -TOUCH_SECONDS) >= TOUCH_SECONDS:
            self.touched[key_id] = at
            await self.redis.hset(keys.API_KEYS_USED, key_id, round(now, 3))
        return Principal(admin=False, tenant=record["tenant"])

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
        return await self.accept(record)


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise ApiError(403, "this endpoint needs the admin key")
