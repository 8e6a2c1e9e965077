"""Every key has an owner and an end: an idle session leaves no key (and no entry in any shared
structure) after its TTL, while a session with waiting work never expires under it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings, sse, submit, wait_for

TTL = 1
PAST_TTL = 2.5


@pytest.fixture
def ttl_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, session_ttl=TTL)).start(workers=1)
    yield running
    running.stop()


def mentions(r: redis.Redis, needles: list[str]) -> list[str]:
    """Every key whose name, or any of whose members, fields or values, mentions one of `needles`."""
    found = []
    for key in r.scan_iter(match="*", count=1000):
        kind = r.type(key)
        if kind == "string":
            content = [r.get(key) or ""]
        elif kind == "hash":
            content = [x for pair in r.hgetall(key).items() for x in pair]
        elif kind == "list":
            content = r.lrange(key, 0, -1)
        elif kind == "set":
            content = list(r.smembers(key))
        elif kind == "zset":
            content = r.zrange(key, 0, -1)
        else:
            content = []
        texts = [key, *content] if kind != "string" or len(content[0]) < 100_000 else [key]
        if any(n in t for n in needles for t in texts):
            found.append(key)
    return found


def status(base_url: str, rid: str) -> str:
    return call("GET", f"{base_url}/v1/requests/{rid}")[1]["status"]


def assert_gone(base_url: str, r: redis.Redis, sid: str, rids: list[str]) -> None:
    assert mentions(r, [sid, *rids]) == [], "keys (or entries) outlived the session's TTL"
    code, body = call("GET", f"{base_url}/v1/sessions/{sid}/events")
    assert code == 404 and body["error"]["type"] == "not_found", (code, body)
    for rid in rids:
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
            code, body = call(method, f"{base_url}/v1/requests/{rid}{path}")
            assert code == 404 and "error" in body, (method, path, code, body)


def test_idle_session_leaves_nothing_after_its_ttl(ttl_stack: Stack, r: redis.Redis) -> None:
    base = ttl_stack.base_url
    sid = f"ttl-{uuid.uuid4().hex[:8]}"
    quick = submit(base, sid, max_tokens=8, prompt="a")
    long_running = submit(base, sid, max_tokens=4000, prompt="b")
    after = submit(base, sid, max_tokens=8, prompt="c")
    never_ran = submit(base, sid, max_tokens=8, prompt="d")
    rids = [quick, long_running, after, never_ran]
    assert call("DELETE", f"{base}/v1/requests/{never_ran}")[0] == 200  # cancelled while queued
    wait_for(lambda: call("GET", f"{base}/v1/requests/{long_running}")[1]["tokens"] > 0, timeout=20,
             what="the long request to run")
    assert call("DELETE", f"{base}/v1/requests/{long_running}")[0] == 200  # cancelled while running
    events = list(sse(base, f"/v1/sessions/{sid}/events", until=lambda e: e.event in ("done", "cancelled")
                      and e.data["request_id"] == after, timeout=30))
    ends = {e.data["request_id"]: e.event for e in events if e.event in ("done", "cancelled", "error")}
    assert ends == {quick: "done", long_running: "cancelled", after: "done", never_ran: "cancelled"}
    # the worker has let go of the cancelled run and every slot is back
    wait_for(lambda: r.llen("sg:{g:default}:idle") == 4 and r.zcard("sg:{g:default}:run") == 0, what="slots back")
    assert mentions(r, [sid]), "the session should still be there within its TTL"
    time.sleep(PAST_TTL)
    assert_gone(base, r, sid, rids)


def test_waiting_work_keeps_its_session_alive(ttl_stack: Stack, r: redis.Redis) -> None:
    base = ttl_stack.base_url
    sid = f"wait-{uuid.uuid4().hex[:8]}"
    first = submit(base, sid, max_tokens=5, prompt="one")
    wait_for(lambda: status(base, first) == "done", what="the first request")
    # the session is idle now (its TTL armed); new work for a group declared but not served yet arrives
    assert call("PUT", f"{base}/v1/admin/groups/later", {})[0] == 200
    waiting = submit(base, sid, max_tokens=5, prompt="two", group="later")
    time.sleep(PAST_TTL)
    assert status(base, waiting) == "queued"
    for key in (keys.session_meta(sid), keys.session_queue(sid), keys.session_log(sid), keys.request(waiting)):
        assert r.exists(key) and r.ttl(key) == -1, f"{key} would expire under a waiting request"
    replay = list(sse(base, f"/v1/sessions/{sid}/events", stop_after=100, timeout=5,
                      until=lambda e: e.event == "queued" and e.data["request_id"] == waiting))
    assert replay[0].id == 1 and replay[-1].data["request_id"] == waiting, "the session's log was cut"

    ttl_stack.add_worker(group="later")
    wait_for(lambda: status(base, waiting) == "done", timeout=20, what="the waiting request to run")
    wait_for(lambda: r.llen(keys.group_key("later", "idle")) == 4, what="the slot back")
    time.sleep(PAST_TTL)
    assert_gone(base, r, sid, [first, waiting])
