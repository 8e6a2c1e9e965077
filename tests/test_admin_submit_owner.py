"""Tenancy with auth on holds for the admin key and across an auth switch: the admin key submitting for a
tenant reaches only that tenant's sessions (another tenant's is the 403 a tenant key gets, nothing stored);
a streamed chat that can never be admitted is its 403 at max_streams, not a retryable 429; a stream token
minted while auth was off is refused once auth is on (the signing secret outlives the restart in Redis)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json

import redis

from sluicegate.api.stream_tokens import SECRET_KEY
from tests.helpers import Stack, call, fast_settings, stored_requests, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def new_key(base: str, tenant: str) -> dict[str, str]:
    code, created = call("POST", f"{base}/v1/admin/keys", {"tenant": tenant}, headers=ADMIN)
    assert code == 201, created
    return {"Authorization": f"Bearer {created['key']}"}


def stream_status(base: str, path: str, headers: dict[str, str] | None = None) -> int:
    """The status a stream opens with (its body left unread)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_admin_submitting_for_a_tenant_reaches_only_its_sessions(auth_stack: Stack, r: redis.Redis) -> None:
    base = auth_stack.base_url
    acme, globex = new_key(base, "acme"), new_key(base, "globex")
    assert call("POST", f"{base}/v1/sessions/s-acme/requests", {"prompt": "x", "max_tokens": 2},
                headers=acme)[0] == 202
    tenant_refused = call("POST", f"{base}/v1/sessions/s-acme/requests", {"prompt": "x", "max_tokens": 2},
                          headers=globex)
    assert tenant_refused[0] == 403, tenant_refused
    before = stored_requests(r)
    code, reply = call("POST", f"{base}/v1/sessions/s-acme/requests",
                       {"prompt": "globex's", "max_tokens": 2, "tenant": "globex"}, headers=ADMIN)
    assert code == 403 and reply["error"]["type"] == tenant_refused[1]["error"]["type"], (code, reply)
    code, reply = call("POST", f"{base}/v1/chat/completions", CHAT,
                       headers={**ADMIN, "X-Tenant": "globex", "X-Session-Id": "s-acme"})
    assert code == 403 and reply["error"]["type"] == tenant_refused[1]["error"]["type"], (code, reply)
    assert stored_requests(r) == before
    # for the session's own tenant the admin submits as before
    code, reply = call("POST", f"{base}/v1/sessions/s-acme/requests",
                       {"prompt": "acme's", "max_tokens": 2, "tenant": "acme"}, headers=ADMIN)
    assert code == 202, reply


def test_a_streamed_chat_that_can_never_be_admitted_is_403_at_max_streams(auth_stack: Stack) -> None:
    base = auth_stack.base_url
    acme, globex = new_key(base, "acme"), new_key(base, "globex")
    assert call("PUT", f"{base}/v1/admin/tenants/globex", {"max_streams": 1, "max_priority": 5},
                headers=ADMIN)[0] == 200
    for key, session in ((acme, "s-acme"), (globex, "s-glx")):
        assert call("POST", f"{base}/v1/sessions/{session}/requests", {"prompt": "x", "max_tokens": 2},
                    headers=key)[0] == 202
    host, port = base.removeprefix("http://").split(":")
    held = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        held.request("GET", "/v1/sessions/s-glx/events", headers=globex)
        assert held.getresponse().status == 200
        wait_for(lambda: call("GET", f"{base}/v1/admin/stats", headers=ADMIN)[1]["api_process"]
                 ["open_streams_by_tenant"] == {"globex": 1}, what="globex's stream to be counted")
        streamed, chat = {**CHAT, "stream": True}, f"{base}/v1/chat/completions"
        code, reply = call("POST", chat, streamed, headers={**globex, "X-Session-Id": "s-acme"})
        assert (code, reply["error"]["type"]) == (403, "forbidden"), reply
        code, reply = call("POST", chat, streamed, headers={**globex, "X-Priority": "9"})
        assert (code, reply["error"]["type"]) == (403, "priority_not_allowed"), reply
        code, reply = call("POST", chat, streamed, headers=globex)
        assert (code, reply["error"]["type"]) == (429, "tenant_limit"), reply
    finally:
        held.close()


def restarted(stack: Stack, redis_url: str) -> Stack:
    """`stack` stopped, and an API with auth on started on the same store."""
    stack.stop()
    return Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=0, scheduler=False)


def test_a_stream_token_minted_with_auth_off_is_refused_once_auth_is_on(redis_url: str) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0, scheduler=False)  # auth off: anyone may mint
    try:
        base = stack.base_url
        assert call("POST", f"{base}/v1/sessions/s-acme/requests",
                    {"prompt": "x", "max_tokens": 1, "tenant": "acme"})[0] == 202
        old = [call("POST", f"{base}/v1/stream-tokens", scope)[1]["events_url"]
               for scope in ({"stats": True}, {"session_id": "s-acme"})]
        stack = restarted(stack, redis_url)
        base = stack.base_url
        assert [stream_status(base, url) for url in old] == [401, 401]
        # the admin key's own tokens, minted with auth on, open the same streams
        new = [call("POST", f"{base}/v1/stream-tokens", scope, headers=ADMIN)[1]["events_url"]
               for scope in ({"stats": True}, {"session_id": "s-acme"})]
        assert [stream_status(base, url) for url in new] == [200, 200]
    finally:
        stack.stop()


def test_the_admin_keys_stream_tokens_end_with_the_key(redis_url: str) -> None:
    """Rotating a leaked admin key (or removing it) ends the tokens it minted, as revoking a tenant key
    ends its tokens: they carried only "minted by the admin key", and opened any stream for their TTL."""
    stack = Stack(fast_settings(redis_url, auth=True, admin_key="key-a")).start(workers=0, scheduler=False)
    try:
        base = stack.base_url
        assert call("POST", f"{base}/v1/sessions/s-acme/requests", {"prompt": "x", "max_tokens": 1, "tenant": "acme"},
                    headers={"Authorization": "Bearer key-a"})[0] == 202
        minted = [call("POST", f"{base}/v1/stream-tokens", scope, headers={"Authorization": "Bearer key-a"})[1]
                  for scope in ({"stats": True}, {"session_id": "s-acme"})]
        assert [stream_status(base, token["events_url"]) for token in minted] == [200, 200]
        for admin_key in ("key-b", None):
            stack.stop()
            stack = Stack(fast_settings(redis_url, auth=True, admin_key=admin_key)).start(workers=0, scheduler=False)
            assert [stream_status(stack.base_url, token["events_url"]) for token in minted] == [401, 401], admin_key
        stack.stop()
        stack = Stack(fast_settings(redis_url, auth=True, admin_key="key-a")).start(workers=0, scheduler=False)
        assert [stream_status(stack.base_url, token["events_url"]) for token in minted] == [200, 200]  # the same key
    finally:
        stack.stop()


def test_an_admin_token_of_the_version_before_says_so(auth_stack: Stack, r: redis.Redis) -> None:
    """A token minted before admin tokens named their key (`adm: 1`), as an older API process still mints
    during a rolling upgrade: refused, saying so, not that the admin key changed (it did not)."""
    base = auth_stack.base_url
    minted = call("POST", f"{base}/v1/stream-tokens", {"stats": True}, headers=ADMIN)[1]
    payload = json.loads(base64.urlsafe_b64decode(minted["token"].partition(".")[0] + "=="))
    old = base64.urlsafe_b64encode(json.dumps({**payload, "adm": 1}).encode()).rstrip(b"=")
    secret = bytes.fromhex(r.get(SECRET_KEY))
    signature = base64.urlsafe_b64encode(hmac.new(secret, old, hashlib.sha256).digest()).rstrip(b"=")
    path = minted["events_url"].replace(minted["token"], f"{old.decode()}.{signature.decode()}")
    code, body = call("GET", f"{base}{path}")
    assert code == 401 and "older version" in body["error"]["message"], body
    assert stream_status(base, minted["events_url"]) == 200
