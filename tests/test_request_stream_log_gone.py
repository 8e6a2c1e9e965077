"""A request stream whose session's log no longer holds the request's events is a 409 `cursor_expired`,
not an empty 200 (an EventSource would reconnect to that for ever). It happens when the request's hash
outlives its session: a callback still being retried keeps it (callback_claim.lua, callback_settle.lua)
while the session's meta and log expire, or the session id is then used again by a new life."""

from __future__ import annotations

import http.client
import json
from typing import Any

import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings, submit, wait_for

KEPT_MS = 60_000  # what callback_claim/settle give a request hash whose callback is still being tried


def get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A GET whose body is read whole (a stream that ended, or an error), JSON decoded when it is JSON."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        is_json = response.getheader("content-type", "").startswith("application/json")
        return response.status, json.loads(body) if is_json else body
    finally:
        connection.close()


def done_and_kept(base: str, r: redis.Redis, sid: str, rids: list[str]) -> None:
    """The requests end, their hashes are kept as a pending callback keeps them, and the session expires."""
    wait_for(lambda: all(call("GET", f"{base}/v1/requests/{rid}")[1]["status"] == "done" for rid in rids),
             what="requests done")
    for rid in rids:
        r.pexpire(keys.request(rid), KEPT_MS)
    wait_for(lambda: not r.exists(keys.session_meta(sid)) and not r.exists(keys.session_log(sid)),
             timeout=10, what="the session expired")


def assert_log_gone(base: str, rid: str, why: str) -> None:
    status, body = get(base, f"/v1/requests/{rid}/events")
    assert status == 409, (status, body)
    assert body["error"]["type"] == "cursor_expired", body
    message = body["error"]["message"]
    assert why in message and f"GET /v1/requests/{rid}" in message, message


def test_an_expired_sessions_request_stream_is_a_409(short: Stack, r: redis.Redis) -> None:
    base, sid = short.base_url, "gone-expired"
    first = submit(base, sid, prompt="a", max_tokens=3)  # its first event is the session's first (cursor 0)
    second = submit(base, sid, prompt="b", max_tokens=3)
    done_and_kept(base, r, sid, [first, second])
    for rid in (first, second):
        assert call("GET", f"{base}/v1/requests/{rid}")[0] == 200  # the request itself is still there
        assert_log_gone(base, rid, "the session expired")
        # resumed, it was a 409 already: past the last event of a session that has none
        status, body = get(base, f"/v1/requests/{rid}/events", {"Last-Event-ID": r.hget(keys.request(rid), "fs")})
        assert status == 409 and body["error"]["type"] == "cursor_expired", (status, body)


def test_a_request_stream_of_a_session_id_used_again_is_a_409(short: Stack, r: redis.Redis) -> None:
    base, sid = short.base_url, "gone-reused"
    old = submit(base, sid, prompt="old", max_tokens=3)
    done_and_kept(base, r, sid, [old])
    new = submit(base, sid, prompt="new", max_tokens=3)  # a new life of the id: its event ids start at 1 again
    wait_for(lambda: call("GET", f"{base}/v1/requests/{new}")[1]["status"] == "done", what="the new request done")
    for key in (keys.session_meta(sid), keys.session_log(sid)):
        r.pexpire(key, KEPT_MS)  # the new life outlives the check
    fs = int(r.hget(keys.request(old), "fs"))
    assert r.lindex(keys.session_log(sid), 0).split("|")[:3] == [str(fs), "queued", new]  # id fs is the new one's
    assert_log_gone(base, old, "used again")
    status, body = get(base, f"/v1/requests/{new}/events")  # the new life's own request streams as usual
    assert status == 200 and b"event: done" in body, (status, body)


def test_a_just_accepted_request_all_of_whose_events_were_trimmed_is_told_where_its_state_is(redis_url: str) -> None:
    """The first stream of a request this API process accepted moments ago (api/recent.py: no read of its head),
    which ended and all of whose events were trimmed since (--session-log-max-events): old, a 409 that said to
    resume from the oldest kept id for what is left of it, though nothing is (that resume is a 204)."""
    stack = Stack(fast_settings(redis_url, session_log_max_events=100, sim_tokens_per_second=2000.0)).start(workers=1)
    try:
        base, sid = stack.base_url, "gone-trimmed-fresh"
        rids = [submit(base, sid, prompt=f"p{i}", max_tokens=60) for i in range(3)]
        wait_for(lambda: all(call("GET", f"{base}/v1/requests/{rid}")[1]["status"] == "done" for rid in rids),
                 what="requests done")
        assert_log_gone(base, rids[0], "trimmed")
    finally:
        stack.stop()
