"""A request stream whose request's events are not in its session's log ends, or is refused, instead of
answering as if the request had nothing more to send:
- resumed, an ended request whose session expired and whose id was used again (its hash outlived it: a
  callback still being retried keeps it) is the 409 of the same stream without a cursor, not the 204 of a
  resume from its terminal event or later (the client would never get what it missed);
- a stream given the reader joined before its submit (api/recent.py), whose request the store lost when it
  restarted from an older state, ends once a log read shows the request's first event gone, instead of
  pinging for ever: the reconnect gets the 404."""

from __future__ import annotations

import http.client
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from sluicegate.embedded import EmbeddedServer, free_port
from sluicegate.sessions import keys
from tests.helpers import SseEvent, Stack, call, fast_settings, sse, submit, wait_for
from tests.test_request_stream_log_gone import KEPT_MS, get


def resumed(base: str, rid: str, cursor: int) -> tuple[int, Any]:
    return get(base, f"/v1/requests/{rid}/events", {"Last-Event-ID": str(cursor)})


def test_a_resume_of_a_request_whose_session_id_was_used_again_is_a_409(short: Stack, r: redis.Redis) -> None:
    base, sid = short.base_url, "reused-resume"
    old = submit(base, sid, prompt="old", max_tokens=5)
    wait_for(lambda: call("GET", f"{base}/v1/requests/{old}")[1]["status"] == "done", what="old done")
    events = list(sse(base, f"/v1/requests/{old}/events", timeout=10))
    assert events[-1].event == "done", [(e.id, e.event) for e in events]
    last = events[-1].id
    assert resumed(base, old, last) == (204, b"")  # its own life: past its terminal event, nothing left
    r.pexpire(keys.request(old), KEPT_MS)
    wait_for(lambda: not r.exists(keys.session_meta(sid)), timeout=10, what="the session expired")
    new = submit(base, sid, prompt="new", max_tokens=20)  # a new life: ids from 1 again, past the old's end
    wait_for(lambda: call("GET", f"{base}/v1/requests/{new}")[1]["status"] == "done", what="new done")
    for key in (keys.session_meta(sid), keys.session_log(sid)):
        r.pexpire(key, KEPT_MS)  # the new life outlives the checks
    assert int(r.hget(keys.session_meta(sid), "seq")) > last
    # the client had the old request's first three events when its connection broke (old: a 204, though
    # it never got the rest), and the reconnect of one that had them all: the log cannot tell them apart
    for cursor in (events[2].id, last):
        status, body = resumed(base, old, cursor)
        assert status == 409, (cursor, status, body)
        assert body["error"]["type"] == "cursor_expired", body
        message = body["error"]["message"]
        assert "used again" in message and f"GET /v1/requests/{old}" in message, message
    # the new life's own request resumes as usual
    new_events = list(sse(base, f"/v1/requests/{new}/events", timeout=10))
    assert resumed(base, new, new_events[-1].id) == (204, b"")
    code, body = resumed(base, new, new_events[2].id)
    assert code == 200 and b"event: done" in body, (code, body)


def subscribed(url: str) -> bool:
    """The API's subscriber holds a session channel (sharded pub/sub) on the server."""
    try:
        client = redis.Redis.from_url(url, decode_responses=True)
        try:
            return any(entry.get("ssub", "0") not in ("0", 0) for entry in client.client_list())
        finally:
            client.close()
    except redis.RedisError:
        return False


@pytest.mark.single_server
def test_a_joined_stream_of_a_request_lost_in_a_store_restart_ends(tmp_path: Path) -> None:
    """The submit on a session this process follows takes a reader (api/recent.py); the store restarts
    from a state older than the submit, and the GET comes once the subscriber resubscribed: the reader is
    sent to the log, whose read empties its queue (the lost `queued`) and ends at the cursor. Old: no gap
    showed, and the stream pinged for ever (still open 8 s on, a later submit's events passing by)."""
    server = EmbeddedServer(data_dir=str(tmp_path / "aof"), port=free_port(), persistent=True,
                            appendfsync="always").start()
    stack = Stack(fast_settings(server.url)).start(workers=0)  # nothing runs: a session's ids are exact
    try:
        base, sid = stack.base_url, "lost-joined"
        submit(base, sid, prompt="kept", max_tokens=5)  # event 1
        follower: list[SseEvent] = []  # a client following the session on this process: its channel
        threading.Thread(target=lambda: follower.extend(sse(base, f"/v1/sessions/{sid}/events", last_id=1,
                                                            timeout=30)), daemon=True).start()
        wait_for(lambda: subscribed(server.url), what="the session's channel subscribed")
        time.sleep(0.2)
        aof = Path(server.data_dir) / "appendonlydir"
        older = tmp_path / "older"
        shutil.copytree(aof, older)
        lost = submit(base, sid, prompt="lost", max_tokens=5)  # event 2, a reader joined before it
        server.kill()
        shutil.rmtree(aof)
        shutil.copytree(older, aof)
        server.process = None
        server.start()
        wait_for(lambda: subscribed(server.url), timeout=5, interval=0.01, what="resubscribed")
        assert call("GET", f"{base}/v1/requests/{lost}")[0] == 404

        host, port = base.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=20)
        lines: list[bytes] = []
        try:
            connection.request("GET", f"/v1/requests/{lost}/events")
            response = connection.getresponse()
            assert response.status == 200  # (the reader taken at the submit: no read before the answer)

            def read() -> None:
                while line := response.readline():
                    if line.strip():
                        lines.append(line.strip())
                lines.append(b"<end>")

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(3)
            if reader.is_alive():  # a later submit's events (ids past the restart's jump) pass the stream by
                wait_for(lambda: try_submit(base, sid), timeout=10, what="a later submit")
                reader.join(5)
        finally:
            connection.close()
        assert lines and lines[-1] == b"<end>", f"the stream of a request that is gone stays open: {lines}"
        assert not any(line.startswith(b"event:") for line in lines), lines  # nothing of it: its events are gone
        assert get(base, f"/v1/requests/{lost}/events")[0] == 404  # the EventSource's reconnect stops there
    finally:
        stack.stop()
        server.stop()


def try_submit(base: str, sid: str) -> str | None:
    """A submit once the store answers again (None while it cannot)."""
    try:
        code, reply = call("POST", f"{base}/v1/sessions/{sid}/requests", {"prompt": "later", "max_tokens": 5})
    except OSError:
        return None
    return reply["request_id"] if code == 202 else None


@pytest.mark.single_server
def test_the_reconnect_after_a_terminal_event_reads_the_log_once(redis_url: str, r: redis.Redis) -> None:
    """The 204 of an EventSource's reconnect after its stream's end costs no read for the check above: the
    event at the cursor (the request's own terminal event), read with the first page, tells."""
    stack = Stack(fast_settings(redis_url)).start(workers=1)
    try:
        base, sid = stack.base_url, "reconnect-once"
        rid = submit(base, sid, prompt="p", max_tokens=5)
        wait_for(lambda: call("GET", f"{base}/v1/requests/{rid}")[1]["status"] == "done", what="done")
        last = list(sse(base, f"/v1/requests/{rid}/events", timeout=10))[-1].id
        end = "reconnect-once-end"
        watcher = redis.Redis(host="127.0.0.1", port=r.connection_pool.connection_kwargs["port"],
                              password=r.connection_pool.connection_kwargs.get("password"), decode_responses=True)
        try:
            with watcher.monitor() as monitor:
                assert resumed(base, rid, last) == (204, b"")
                watcher.set(end, 1)
                reads = 0
                while end not in (seen := monitor.next_command())["command"]:
                    reads += "read_log" in seen["command"] and sid in seen["command"]
            watcher.delete(end)
        finally:
            watcher.close()
        assert reads == 1
    finally:
        stack.stop()


def test_a_resume_at_or_past_the_terminal_event_of_a_request_trimmed_since_is_a_204(redis_url: str) -> None:
    """The check above answers 409 only on a sign of another life: a request whose events later requests'
    trimmed from the log (`--session-log-max-events`) is still read to its end at its terminal event, however
    far the cursor is past it. Old (this stop's first form of the check): 409 "event id 1 was trimmed"."""
    stack = Stack(fast_settings(redis_url, session_log_max_events=100)).start(workers=1)
    try:
        base, sid = stack.base_url, "trimmed-since"
        first = submit(base, sid, prompt="a", max_tokens=5)
        wait_for(lambda: call("GET", f"{base}/v1/requests/{first}")[1]["status"] == "done", what="done")
        terminal = list(sse(base, f"/v1/requests/{first}/events", timeout=10))[-1].id
        later = submit(base, sid, prompt="b", max_tokens=97)  # its events trim the first request's
        wait_for(lambda: call("GET", f"{base}/v1/requests/{later}")[1]["status"] == "done", timeout=30, what="done")
        last = list(sse(base, f"/v1/requests/{later}/events", timeout=10))[-1].id
        for cursor in (terminal, last):
            assert resumed(base, first, cursor) == (204, b""), cursor
    finally:
        stack.stop()
