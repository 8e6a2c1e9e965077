"""An open SSE stream ends once the tenant key it was opened with (itself, or through a stream token
minted from it) is revoked or expires: a leaked key's streams must not go on delivering the tenant's
later output.

The stream asks between its batches and at its idle pings, at most every `CHECK_SECONDS` (and at once
after a revocation through this process), and the answer is a local lookup in the key ring's cache
(api/auth.py), read again from Redis at most every `KEY_CHECK_SECONDS` per key: no Redis command per
stream. So a revoked or expired key's streams deliver nothing written more than CHECK_SECONDS +
KEY_CHECK_SECONDS after the revocation (at once when it went through this API process; within
CHECK_SECONDS of an expiry), and an idle stream closes at its next ping after that.
"""

from __future__ import annotations

import time

from redis.exceptions import RedisError

from sluicegate.api.auth import KEY_CHECK_SECONDS, KeyRing, Principal
from sluicegate.sessions.connect import UNAVAILABLE

CHECK_SECONDS = 2.0
ENDED_MESSAGE = "the API key of this stream was revoked or expired"  # a stream's last words when it ends so
BOUND_SECONDS = CHECK_SECONDS + KEY_CHECK_SECONDS  # the README's bound


class KeyWatch:
    """One stream's view of its key: `due()` is a clock read, `ended()` a cache lookup."""

    def __init__(self, ring: KeyRing, key_id: str, expires_at: float | None) -> None:
        self.ring = ring
        self.key_id = key_id
        self.expires_at = expires_at
        self.next_at = time.monotonic() + CHECK_SECONDS
        self.revocations = ring.revocations

    def due(self) -> bool:
        return time.monotonic() >= self.next_at or self.ring.revocations != self.revocations

    async def ended(self) -> bool:
        """The key was revoked or expired (False while the store does not answer: the stream's own
        reads fail then, and a reconnect is checked in full)."""
        self.next_at = time.monotonic() + CHECK_SECONDS
        self.revocations = self.ring.revocations
        if self.expires_at is not None and time.time() >= self.expires_at:
            return True
        try:
            return not await self.ring.key_live(self.key_id)
        except (*UNAVAILABLE, RedisError):
            return False


def key_watch(ring: KeyRing, who: Principal) -> KeyWatch | None:
    """A watch for a tenant key's stream; None for the admin and with auth off (nothing to revoke)."""
    if who.key_id is None:
        return None
    return KeyWatch(ring, who.key_id, who.expires_at)
