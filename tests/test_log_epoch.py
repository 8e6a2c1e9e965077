"""Event ids are never issued twice, even when the store restarts from an older state (AOF with
appendfsync everysec loses up to a second of writes; a failover loses what the replica had not got):
the first id a session assigns after a restart skips a million, a cursor that may name a lost event
is a 409, and a live stream whose last event was lost ends instead of silently going on with others."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sluicegate.embedded import EmbeddedServer, free_port
from sluicegate.sessions import keys
from sluicegate.sessions.scripts import Scripts
from tests.helpers import SseEvent, Stack, call, fast_settings, sse, submit, wait_for

JUMP = 1_000_000  # LOG_ID_JUMP in sessions/lua/includes/log_ids.lua


def resume(base_url: str, path: str, last_id: int, count: int) -> tuple[int, Any]:
    """The status and error of a resume that is refused, or the ids of the first `count` events."""
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path, headers={"Last-Event-ID": str(last_id)})
        response = connection.getresponse()
        if response.status != 200:
            return response.status, json.loads(response.read())
    finally:
        connection.close()
    return 200, [e.id for e in sse(base_url, path, last_id=last_id, stop_after=count, timeout=10)]


def lost(code: int, reply: Any, kept_before: int) -> bool:
    error = reply["error"] if isinstance(reply, dict) else {}
    return code == 409 and error.get("type") == "cursor_expired" and \
        f"the last event kept before it is {kept_before}" in error.get("message", "")


@pytest.fixture
def api_only(redis_url: str) -> Iterator[Stack]:
    """The API alone: submits write `queued` events and nothing runs, so a session's ids are exact."""
    running = Stack(fast_settings(redis_url)).start(workers=0)
    yield running
    running.stop()


def test_ids_skip_after_a_restart_and_resumes_read_across_the_hole(api_only: Stack, r: redis.Redis) -> None:
    """A library reload is what a restart looks like to the ids (the boot they remember is gone)."""
    base, sid = api_only.base_url, "epoch-hole"
    for n in range(3):
        submit(base, sid, prompt=f"before {n}", max_tokens=5)
    r.function_flush()  # the next call loads the library again: a new boot
    late = submit(base, sid, prompt="after", max_tokens=5)
    assert r.hget(keys.session_meta(sid), "hl") == f"3:{3 + JUMP + 1}"

    path = f"/v1/sessions/{sid}/events"
    assert [e.id for e in sse(base, path, stop_after=4, timeout=10)] == [1, 2, 3, JUMP + 4]
    assert resume(base, path, 3, 1) == (200, [JUMP + 4])  # the last event kept before the hole
    assert resume(base, path, JUMP + 3, 1) == (200, [JUMP + 4])  # the hole's end is the same place
    for cursor in (4, 1000, JUMP + 2):  # ids a crashed server may have handed out and lost
        code, reply = resume(base, path, cursor, 1)
        assert lost(code, reply, 3), (cursor, code, reply)
    code, reply = resume(base, path, JUMP + 5, 1)
    assert code == 409 and "past the last event" in reply["error"]["message"]
    # a request stream from the request's first event starts at the hole's end
    (queued,) = list(sse(base, f"/v1/requests/{late}/events", stop_after=1, timeout=10))
    assert queued.event == "queued" and queued.id == JUMP + 4 and queued.data["request_id"] == late


def test_a_second_restart_keeps_the_first_restarts_hole(api_only: Stack, r: redis.Redis) -> None:
    """A jump adds its hole to those the meta holds (read only when a jump is made): the first restart's
    jump is taken by a cancel's event (the ids of a call that did not read the meta first), the second by a
    submit (which read it itself); each must keep the hole before it."""
    base, sid = api_only.base_url, "epoch-two-holes"
    rids = [submit(base, sid, prompt=f"before {n}", max_tokens=5) for n in range(3)]
    r.function_flush()
    assert call("DELETE", f"{base}/v1/requests/{rids[2]}")[0] == 200  # event 4, past the first jump
    first_hole = f"3:{3 + JUMP + 1}"
    assert r.hget(keys.session_meta(sid), "hl") == first_hole
    r.function_flush()
    submit(base, sid, prompt="after", max_tokens=5)
    last_before = JUMP + 4
    assert r.hget(keys.session_meta(sid), "hl") == f"{first_hole},{last_before}:{last_before + JUMP + 1}"
    ids = [e.id for e in sse(base, f"/v1/sessions/{sid}/events", stop_after=5, timeout=10)]
    assert ids == [1, 2, 3, JUMP + 4, 2 * JUMP + 5]
    code, reply = resume(base, f"/v1/sessions/{sid}/events", JUMP + 10, 1)  # inside the second hole
    assert lost(code, reply, JUMP + 4), (code, reply)


def test_a_process_that_loads_the_library_again_starts_no_new_boot(api_only: Stack, r: redis.Redis) -> None:
    """Processes that start together all find the library missing and all load it. A second load of the
    same library is not a restart: it must not skip ids (it did while loads replaced the library, which
    restarted its boot; the rollback test below then saw its events 2 and 3 a million ids on)."""
    base, sid = api_only.base_url, "epoch-reload"
    submit(base, sid, prompt="first", max_tokens=5)
    Scripts(r).load()  # as a scheduler or worker starting beside the API does
    submit(base, sid, prompt="second", max_tokens=5)
    assert r.hmget(keys.session_meta(sid), ["seq", "hl"]) == ["2", None]
    assert [e.id for e in sse(base, f"/v1/sessions/{sid}/events", stop_after=2, timeout=10)] == [1, 2]


def test_trimming_moves_past_a_hole(redis_url: str, r: redis.Redis) -> None:
    """The bounded log (--session-log-max-events) trims by list offset; the oldest kept id is mapped
    across the hole, and the hole is forgotten once everything before it is gone."""
    stack = Stack(fast_settings(redis_url, session_log_max_events=100)).start(workers=0)
    try:
        base, sid = stack.base_url, "epoch-trim"
        # queued requests are never trimmed (they have not ended): cancel each at once so the log can move on
        for n in range(60):
            rid = submit(base, sid, prompt=f"a{n}", max_tokens=1)
            assert call("DELETE", f"{base}/v1/requests/{rid}")[0] == 200
        seq_before = int(r.hget(keys.session_meta(sid), "seq"))
        r.function_flush()
        for n in range(30):
            rid = submit(base, sid, prompt=f"b{n}", max_tokens=1)
            assert call("DELETE", f"{base}/v1/requests/{rid}")[0] == 200
        seq, oldest, holes = r.hmget(keys.session_meta(sid), ["seq", "base", "hl"])
        after_hole = seq_before + JUMP + 1
        kept = [int(e.split("|", 1)[0]) for e in r.lrange(keys.session_log(sid), 0, -1)]
        assert len(kept) == 100 and kept[-1] == int(seq) and int(oldest) == kept[0]
        assert holes == f"{seq_before}:{after_hole}" and kept[0] < after_hole
        assert kept == [i for i in range(kept[0], int(seq) + 1) if i <= seq_before or i >= after_hole]
        events = list(sse(base, f"/v1/sessions/{sid}/events", last_id=kept[9], stop_after=90, timeout=10))
        assert [e.id for e in events] == kept[10:]

        for n in range(40):  # past the hole: everything before it is trimmed
            rid = submit(base, sid, prompt=f"c{n}", max_tokens=1)
            assert call("DELETE", f"{base}/v1/requests/{rid}")[0] == 200
        seq, oldest, holes = r.hmget(keys.session_meta(sid), ["seq", "base", "hl"])
        kept = [int(e.split("|", 1)[0]) for e in r.lrange(keys.session_log(sid), 0, -1)]
        assert holes is None and int(oldest) == kept[0] > after_hole and kept == list(range(kept[0], int(seq) + 1))
    finally:
        stack.stop()


@pytest.mark.single_server  # crashes its own server and restarts it from an older copy of its AOF
def test_a_rollback_never_hands_a_cursor_other_events(tmp_path: Path) -> None:
    server = EmbeddedServer(data_dir=str(tmp_path / "aof"), port=free_port(), persistent=True,
                            appendfsync="always").start()
    stack = Stack(fast_settings(server.url)).start(workers=0)
    try:
        base, sid = stack.base_url, "epoch-rollback"
        path = f"/v1/sessions/{sid}/events"
        submit(base, sid, prompt="kept", max_tokens=5)  # event 1
        snapshot = tmp_path / "older"
        shutil.copytree(Path(server.data_dir) / "appendonlydir", snapshot)  # fsynced: `always`
        submit(base, sid, prompt="lost 1", max_tokens=5)  # event 2
        submit(base, sid, prompt="lost 2", max_tokens=5)  # event 3: the client has seen it

        live: list[SseEvent] = []
        ended = threading.Event()

        def follow() -> None:
            try:
                live.extend(sse(base, path, last_id=3, timeout=30))
            finally:
                ended.set()

        threading.Thread(target=follow, daemon=True).start()
        wait_for(lambda: call("GET", f"{base}/healthz")[1]["open_streams"] >= 1, timeout=10,
                 what="the live stream open")

        server.kill()  # a crash, then a restart from the older state: events 2 and 3 are gone
        shutil.rmtree(Path(server.data_dir) / "appendonlydir")
        shutil.copytree(snapshot, Path(server.data_dir) / "appendonlydir")
        server.process = None
        server.start()
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.hget(keys.session_meta(sid), "seq") == "1"

        wait_for(lambda: call("GET", f"{base}/healthz")[0] == 200, timeout=10)
        new = wait_for(lambda: try_submit(base, sid), timeout=15, what="a submit after the restart")
        assert client.hget(keys.session_meta(sid), "seq") == str(1 + JUMP + 1)

        # the live client, whose last event (3) was lost, is not handed the new event as its successor
        assert ended.wait(15), "the live stream must end"
        assert [e.id for e in live] == [], live
        code, reply = resume(base, path, 3, 1)
        assert lost(code, reply, 1), (code, reply)
        assert resume(base, path, 1, 1) == (200, [JUMP + 2])
        (queued,) = list(sse(base, f"/v1/requests/{new}/events", stop_after=1, timeout=10))
        assert queued.id == JUMP + 2 and queued.data["request_id"] == new
        client.close()
    finally:
        stack.stop()
        server.stop()


def try_submit(base_url: str, sid: str) -> str | None:
    code, reply = call("POST", f"{base_url}/v1/sessions/{sid}/requests", {"prompt": "new", "max_tokens": 5})
    return reply["request_id"] if code == 202 else None


def test_an_ownerless_meta_with_ids_is_kept_not_made_anew(api_only: Stack, r: redis.Redis) -> None:
    """A meta with issued ids but no owner (`sluicegate migrate` writes one for a session with no
    stored request) is an existing session, not a new one: written by an earlier boot, its next id
    skips the jump; the tenant becomes its owner; and it stops expiring while the request waits."""
    base, sid = api_only.base_url, "epoch-ownerless"
    meta = keys.session_meta(sid)
    r.hset(meta, mapping={"seq": "41", "bt": "an-earlier-boot"})
    r.pexpire(meta, 60_000)
    code, reply = call("POST", f"{base}/v1/sessions/{sid}/requests", {"prompt": "p", "max_tokens": 5})
    assert code == 202, (code, reply)
    assert reply["first_event_id"] == 41 + JUMP + 1, "the session's ids went on without the jump"
    assert r.ttl(meta) == -1, "the meta would expire under a waiting request"
    assert r.hget(meta, "tn") == "default"
    assert r.hget(meta, "hl") == f"41:{41 + JUMP + 1}"
