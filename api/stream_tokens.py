"""Stream tokens: browsers cannot send headers on an EventSource, so a caller trades its API key for a
short-lived token scoped to one stream and puts that in the URL (`?token=`).

`POST /v1/stream-tokens {"session_id" | "request_id" | "stats": true}` answers a token good for
`--stream-token-ttl` seconds (default 300) that opens only that session's events, only that
request's events, or (admin only) only the dashboard's stats stream; it is accepted by those routes
and no other. It is checked when a stream opens: a stream opened in time runs on, and a reconnect
after expiry gets 401 and needs a new token.

Tokens are stateless: `<payload>.<HMAC-SHA256>`, both base64url, with a secret that the first API
process to need it generates into Redis (`sg:stream-token-secret`, SET NX), so every API process
accepts every other's tokens and a token survives an API restart. A tenant's token names the key it
was minted with: revoking the key revokes its tokens (its id and record read when a stream opens), and ends the
streams they opened as it ends the key's own (api/key_watch.py). Deleting the
secret (and restarting the API processes) revokes every token. A token with no tenant is the admin's only
when the admin key minted it (`adm`): one minted while auth was off, where anyone may mint, is refused once
auth is on (the secret outlives the restart in Redis).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sluicegate.api.auth import Principal, key_digest, key_record, require_admin
from sluicegate.api.errors import ApiError
from sluicegate.api.requests_routes import check_session_id, request_fields
from sluicegate.api.responses import JSON
from sluicegate.api.services import principal, services
from sluicegate.sessions import keys
from sluicegate.sessions.connect import text

router = APIRouter()
SECRET_KEY = keys.PREFIX + "stream-token-secret"
# A secret that no longer verifies (rotated by deleting it) is read again at most this often.
REREAD_SECONDS = 5.0
SESSION, REQUEST, STATS = "session", "request", "stats"


class StreamTokenBody(BaseModel):
    """Exactly one scope: a session's events, a request's events, or the stats stream (admin)."""

    model_config = ConfigDict(extra="forbid")
    session_id: str | None = Field(None, description="the session whose events the token opens")
    request_id: str | None = Field(None, description="the request whose events the token opens")
    stats: bool | None = Field(None, description="true: the dashboard's stats stream (admin key only)")

    @model_validator(mode="after")
    def _one_scope(self) -> StreamTokenBody:
        given = [self.session_id is not None, self.request_id is not None, bool(self.stats)]
        if sum(given) != 1:
            raise ValueError('give exactly one of "session_id", "request_id", "stats": true')
        return self


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class StreamTokens:
    """Signs and checks tokens with the fleet's shared secret (kept in Redis, cached per process)."""

    def __init__(self, redis: Any, ttl: int, admin_key: str | None = None) -> None:
        self.redis = redis
        self.ttl = ttl
        self.admin_key = admin_key
        self._secret: bytes | None = None
        self._read_at = 0.0

    async def secret(self, *, reread: bool = False) -> bytes:
        if self._secret is None or (reread and time.monotonic() - self._read_at >= REREAD_SECONDS):
            await self.redis.set(SECRET_KEY, secrets.token_hex(32), nx=True)
            self._secret = bytes.fromhex(text(await self.redis.get(SECRET_KEY)))
            self._read_at = time.monotonic()
        return self._secret

    async def mint(self, kind: str, scope_id: str, tenant: str | None, key_id: str | None,
                   key_expires_at: float | None, *, admin: bool = False) -> tuple[str, int]:
        """A token for one stream, and its expiry (never past the key's own). `admin`: the admin key minted it
        with auth on (`adm`), the only token without a tenant that check() accepts."""
        expires_at = int(time.time()) + self.ttl
        if key_expires_at is not None:
            expires_at = min(expires_at, int(key_expires_at))
        fields: dict[str, Any] = {"k": kind, "id": scope_id, "t": tenant, "kid": key_id, "exp": expires_at}
        if admin:
            fields["adm"] = await self._admin_mark()
        payload = _b64(orjson.dumps(fields))
        signature = hmac.new(await self.secret(), payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{_b64(signature)}", expires_at

    async def _admin_mark(self) -> str | None:
        """What ties an admin token to the admin key that minted it: a rotated or removed key ends its tokens,
        as a revoked tenant key ends its own. A keyed hash (the payload is readable): it tells nothing
        about the key to the token's holder. None when there is no admin key (no admin token is good)."""
        if self.admin_key is None:
            return None
        mark = hmac.new(await self.secret(), b"admin-key:" + self.admin_key.encode(), hashlib.sha256).digest()
        return _b64(mark[:16])

    async def check(self, token: str, kind: str, scope_id: str) -> Principal:
        """The principal a token stands for on this stream: 401 when it is forged, expired, revoked,
        made for another stream (the message does not say which other one) or, with no tenant, not minted
        by the admin key the API has now. Called with auth on only (token_principal)."""
        payload, _, signature = token.partition(".")
        try:
            given = _unb64(signature)
            fields = orjson.loads(_unb64(payload))
        except (ValueError, orjson.JSONDecodeError):
            raise ApiError(401, "not a stream token") from None
        for reread in (False, True):
            expected = hmac.new(await self.secret(reread=reread), payload.encode(), hashlib.sha256).digest()
            if hmac.compare_digest(expected, given):
                break
        else:
            raise ApiError(401, "stream token not valid (forged, or the secret changed)")
        if not isinstance(fields, dict) or fields.get("k") != kind or fields.get("id") != scope_id:
            raise ApiError(401, "this stream token is for another stream")
        if not isinstance(fields.get("exp"), int) or time.time() >= fields["exp"]:
            raise ApiError(401, "stream token expired: ask POST /v1/stream-tokens for a new one")
        key_id = fields.get("kid")
        if key_id is not None and await key_record(self.redis, key_id) is None:
            raise ApiError(401, "the API key this stream token came from was revoked")
        tenant = fields.get("t")
        if tenant is None:
            if "adm" not in fields:  # minted while auth was off: anyone could have
                raise ApiError(401, "stream token minted while auth was off: ask POST /v1/stream-tokens for a new one")
            if not isinstance(fields["adm"], str):  # `1`: minted before tokens named their admin key
                raise ApiError(401, "stream token minted by an older version: ask POST /v1/stream-tokens for a "
                                    "new one")
            mark = await self._admin_mark()
            if mark is None or not hmac.compare_digest(fields["adm"], mark):
                raise ApiError(401, "the admin key this stream token came from changed: ask POST /v1/stream-tokens "
                                    "for a new one")
        return Principal(admin=tenant is None, tenant=tenant, key_id=key_id)


def stream_tokens(request: Request) -> StreamTokens:
    """This app's token signer, made on first use (it lives as long as the app's Redis client)."""
    state = request.app.state
    signer: StreamTokens | None = getattr(state, "stream_tokens", None)
    if signer is None or signer.redis is not services(request).redis:
        svc = services(request)
        signer = state.stream_tokens = StreamTokens(svc.redis, svc.settings.stream_token_ttl, svc.settings.admin_key)
    return signer


def token_principal(kind: str, path_param: str | None) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency for a stream route: the API key's principal, or with auth on and no
    Authorization header, the principal of a `?token=` made for this very stream."""

    async def dependency(request: Request, token: str | None = Query(
            None, description="a stream token from POST /v1/stream-tokens, for clients that cannot send headers "
            "(a browser's EventSource); auth on only")) -> Principal:
        svc = services(request)
        if token is None or not svc.keyring.enabled or "authorization" in request.headers:
            return await svc.keyring.principal(request)
        scope_id = request.path_params.get(path_param, "") if path_param else ""
        return await stream_tokens(request).check(token, kind, scope_id)

    return dependency


session_stream_principal = token_principal(SESSION, "session_id")
request_stream_principal = token_principal(REQUEST, "request_id")
stats_stream_principal = token_principal(STATS, None)


async def caller_key(request: Request) -> tuple[str | None, float | None]:
    """The calling tenant key's id and expiry (its token dies with it)."""
    _, _, bearer = request.headers.get("authorization", "").partition(" ")
    raw = await services(request).redis.hget(keys.API_KEYS, key_digest(bearer))
    if raw is None:  # revoked between the check and now
        raise ApiError(401, "unknown or revoked API key")
    record = orjson.loads(raw)
    return record["key_id"], record.get("expires_at")


@router.post("/v1/stream-tokens", status_code=201)
async def create_stream_token(body: StreamTokenBody, request: Request, who: Principal = Depends(principal)):
    """A token for one stream of the caller's own (404 for another tenant's, as for its events)."""
    svc = services(request)
    if body.session_id is not None:
        check_session_id(body.session_id)
        owner, _ = await svc.store.session_state(body.session_id)
        if owner is None or (who.tenant and owner != who.tenant):
            raise ApiError(404, f"no session {body.session_id!r} (never used, or recycled after its TTL)")
        kind, scope_id, url = SESSION, body.session_id, f"/v1/sessions/{body.session_id}/events"
    elif body.request_id is not None:
        request_id, fields = await request_fields(svc, body.request_id)  # an old id: the token is the new id's
        if fields is None or (who.tenant and fields.get("tn") != who.tenant):
            raise ApiError(404, f"no request {body.request_id!r}")
        kind, scope_id, url = REQUEST, request_id, f"/v1/requests/{request_id}/events"
    else:
        require_admin(who)
        kind, scope_id, url = STATS, "", "/v1/admin/stats/stream"
    key_id, key_expires_at = await caller_key(request) if who.tenant else (None, None)
    token, expires_at = await stream_tokens(request).mint(kind, scope_id, who.tenant, key_id, key_expires_at,
                                                          admin=who.tenant is None and svc.keyring.enabled)
    return JSON({"token": token, "expires_at": expires_at, "scope": kind, "events_url": f"{url}?token={token}"},
                status_code=201)
