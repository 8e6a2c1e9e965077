"""API keys: an admin key from settings, tenant keys created at runtime and stored hashed.

With auth off (the default on loopback) every caller is an admin and names its tenant in the body.
With auth on, a tenant key fixes the tenant and sees only its own sessions and requests.

A request checks its key in Redis; an open SSE stream checks its key again every few seconds
(api/key_watch.py) against this process's cache of each key's state, read again at most every
`KEY_CHECK_SECONDS` per key (not per stream: 10,000 streams of one key cost one read per period).
"""

from __future__ import annotations

import asyncio
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
    key_id: str | None = None  # the tenant key (or the key a stream token was minted from)
    expires_at: float | None = None  # the key's expiry (Unix s) when known; None: none, or not known

    @property
    def owner(self) -> str:
        """The owner to enforce on sessions and requests ("" = any)."""
        return self.tenant or ""


OPEN = Principal(admin=True)
# `last_used_at` is written at most this often per key and API process: a key's use costs no write
# per request, and the listing is still accurate to about a minute.
TOUCH_SECONDS = 60.0
# A key's cached state (revoked? expiry?) is read again from Redis at most this often per API process.
KEY_CHECK_SECONDS = 3.0


@dataclass(frozen=True)
class KeyState:
    read_at: float  # monotonic
    exists: bool
    expires_at: float | None = None

    def live(self) -> bool:
        return self.exists and (self.expires_at is None or time.time() < self.expires_at)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def key_record(redis: Redis, key_id: str) -> bytes | None:
    """A key's record, found by its id; None when either is gone. A revoke removes the record first, and one
    that failed before removing the id leaves it pointing at nothing (KeyRing.revoke): that key is gone."""
    digest = await redis.hget(keys.API_KEY_IDS, key_id)
    return None if digest is None else await redis.hget(keys.API_KEYS, digest)


class KeyRing:
    def __init__(self, redis: Redis, *, enabled: bool, admin_key: str | None) -> None:
        self.redis = redis
        self.enabled = enabled
        self.admin_key = admin_key
        self.touched: dict[str, float] = {}  # key_id -> when this process last wrote its last_used_at (monotonic)
        self.states: dict[str, KeyState] = {}  # key_id -> its state as last read (open streams check it)
        self.reading: dict[str, asyncio.Future[KeyState]] = {}  # key_id -> its read in flight (one per key)
        self.revocations = 0  # keys revoked through this process: open streams check theirs at once
        # ...and which: a read of a key's state begun before its revoke must not bring it back to life
        self.revoked: set[str] = set()

    async def create(self, tenant: str, expires_in: float | None = None) -> dict[str, Any]:
        """A new key, shown once; only its digest is stored. `expires_in` (seconds) bounds its life."""
        key = "sg-" + secrets.token_urlsafe(24)
        key_id = "key_" + secrets.token_hex(6)
        now = round(time.time(), 3)
        expires_at = None if expires_in is None else round(now + expires_in, 3)
        record = {"key_id": key_id, "tenant": tenant, "created_at": now, "expires_at": expires_at}
        # Two hashes on two slots (no transaction on a cluster): the id first, so a failure between leaves an
        # id pointing at nothing (refused everywhere, and revoke removes it), never a live key no revoke finds.
        await self.redis.hset(keys.API_KEY_IDS, key_id, key_digest(key))
        await self.redis.hset(keys.API_KEYS, key_digest(key), orjson.dumps(record))
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
        """Revokes the key: True for the one caller that did it (of concurrent revokes of a key, one wins
        and is audited; the others get False, a 404, as a revoke after it does). A revoke that failed after
        removing the record (the id left behind) is finished by the next one, which wins."""
        digest = await self.redis.hget(keys.API_KEY_IDS, key_id)
        if digest is None:
            return False
        # Every revoke removes the record first: from then on the key authenticates no more (nor do its stream
        # tokens), even if the writes below never happen. The id's HDEL then decides, for one caller only:
        # deleting the id first could leave a live key no revoke finds.
        await self.redis.hdel(keys.API_KEYS, digest)
        # gone either way: this process's open streams of the key stop at once, whoever wins
        self.touched.pop(key_id, None)
        self.revoked.add(key_id)
        self._note_state(key_id, False, None)
        self.reading.pop(key_id, None)  # a read in flight returns what it found; the next one reads anew
        self.revocations += 1
        won = await self.redis.hdel(keys.API_KEY_IDS, key_id) == 1
        await self.redis.hdel(keys.API_KEYS_USED, key_id)
        return won

    async def key_live(self, key_id: str) -> bool:
        """The key is neither revoked nor expired, as of a read at most KEY_CHECK_SECONDS old: a local
        lookup, and one read per key and period however many streams ask (they share the read)."""
        state = self.states.get(key_id)
        if state is None or time.monotonic() - state.read_at >= KEY_CHECK_SECONDS:
            reading = self.reading.get(key_id)
            if reading is None:
                reading = self.reading[key_id] = asyncio.ensure_future(self._read_state(key_id))
                reading.add_done_callback(lambda _: self.reading.pop(key_id, None))
            state = await asyncio.shield(reading)  # a cancelled stream does not cancel the others' read
        return state.live()

    async def _read_state(self, key_id: str) -> KeyState:
        raw = await key_record(self.redis, key_id)
        return self._note_state(key_id, raw is not None, None if raw is None else orjson.loads(raw).get("expires_at"))

    def _note_state(self, key_id: str, exists: bool, expires_at: float | None) -> KeyState:
        """Cache what a read found, as of now; a key revoked here stays revoked (a read begun before the
        revoke may finish after it)."""
        state = KeyState(time.monotonic(), exists=exists and key_id not in self.revoked, expires_at=expires_at)
        self.states[key_id] = state
        return state

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
        self._note_state(key_id, True, expires_at)  # just read: a fresh state for the key's open streams
        if at - self.touched.get(key_id, -TOUCH_SECONDS) >= TOUCH_SECONDS:
            self.touched[key_id] = at
            await self.redis.hset(keys.API_KEYS_USED, key_id, round(now, 3))
        return Principal(admin=False, tenant=record["tenant"], key_id=key_id, expires_at=expires_at)

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
