"""The signature of a callback: `X-Sluicegate-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.

The timestamp is signed with the body so that a receiver can refuse replays older than a few minutes
(Stripe's scheme, which receivers' libraries already know how to check)."""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Sluicegate-Signature"


def signature(secret: str, body: bytes, at: int | None = None) -> str:
    t = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify(secret: str, body: bytes, header: str | None, *, tolerance: float = 300.0) -> bool:
    """What a receiver does: the v1 digest matches and the timestamp is recent. A missing header (None, as
    `request.headers.get(HEADER)` gives for an unsigned POST) is no signature: False."""
    if not header:
        return False
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
        fresh = abs(time.time() - t) <= tolerance
    except (KeyError, ValueError, OverflowError):  # OverflowError: a forged `t` too large for a float
        return False
    if not fresh:
        return False
    expected = signature(secret, body, t).split("v1=", 1)[1]
    # As bytes: compare_digest refuses a str with non-ASCII characters (TypeError), which a forged header may hold.
    given = parts.get("v1", "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(expected.encode(), given)
