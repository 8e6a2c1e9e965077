"""Resume: a stream dropped and resumed at random points sees every event once, in order.

The SSE connection is disposable: generation never depends on it, every event is stored, and a
client that reconnects with Last-Event-ID (or ?after=) gets exactly what it missed, then live events.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import SseEvent, Stack, call, fast_settings, sse, submit, wait_for

TERMINAL = ("done", "error", "cancelled")
TOKENS = 200


def events_url(form: str, sid: str, rid: str) -> str:
    return f"/v1/requests/{rid}/events" if form == "request" else f"/v1/sessions/{sid}/events"


def read_with_drops(base_url: str, path: str, *, rng: random.Random, cursor_via: str,
                    done: set[str]) -> tuple[list[SseEvent], int]:
    """Read `path` until the terminal events of all requests in `done` arrived, dropping the
    connection after a random number of events each time and resuming from the last id seen.
    Returns the events in arrival order and the number of connections it took."""
    received: list[SseEvent] = []
    pending = set(done)
    connections = 0
    while pending:
        last = received[-1].id if received else None
        url, header = path, None
        if last is not None:
            if cursor_via == "header":
                header = last
            else:
                url = f"{path}?after={last}"
        connections += 1
        before = len(received)
        for event in sse(base_url, url, last_id=header, stop_after=rng.randint(1, 12), timeout=20):
            received.append(event)
            if event.event in TERMINAL:
                pending.discard(event.data["request_id"])
                if not pending:
                    break
        if pending and len(received) == before and "/v1/requests/" in path:
            raise AssertionError(f"request stream closed with nothing new after {last}")
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.03))  # stay away while generation goes on
    return received, connections


def full_stream(base_url: str, path: str, rids: list[str]) -> list[SseEvent]:
    """One uninterrupted read from the start (the reference the resumed reads must equal)."""
    pending = set(rids)

    def finished(event: SseEvent) -> bool:
        if event.event in TERMINAL:
            pending.discard(event.data["request_id"])
        return not pending

    return list(sse(base_url, path, until=finished, timeout=20))


def assert_exactly_once(events: list[SseEvent], rids: list[str], tokens: int) -> None:
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "an event id was delivered twice"
    assert ids == sorted(ids) and all(b > a for a, b in zip(ids, ids[1:], strict=False)), "ids not increasing"
    for rid in rids:
        mine = [e for e in events if e.data.get("request_id") == rid]
        indices = [e.data["index"] for e in mine if e.event == "token"]
        assert indices == list(range(tokens)), f"{rid}: token indices {indices[:5]}... not 0..{tokens - 1} once"
        names = [e.event for e in mine]
        assert names[0] == "queued" and names[1] == "started" and names[-1] == "done", names[:3] + names[-2:]
        assert mine[-1].data["tokens"] == tokens


@pytest.mark.parametrize("cursor_via", ["header", "after"])
@pytest.mark.parametrize("form", ["request", "session"])
def test_random_drops_resume_exactly_once(stack: Stack, form: str, cursor_via: str) -> None:
    rng = random.Random(f"{form}-{cursor_via}-7")
    sid = f"resume-{form}-{cursor_via}"
    rids = [submit(stack.base_url, sid, max_tokens=TOKENS, prompt=f"story {i}") for i in range(2)]
    connections = 0
    collected: list[SseEvent] = []
    if form == "request":
        for rid in rids:
            events, n = read_with_drops(stack.base_url, events_url(form, sid, rid), rng=rng, cursor_via=cursor_via,
                                        done={rid})
            assert {e.data["request_id"] for e in events} == {rid}, "a request stream leaked another request"
            assert_exactly_once(events, [rid], TOKENS)  # ids increase within one stream
            collected += events
            connections += n
    else:
        collected, connections = read_with_drops(stack.base_url, events_url(form, sid, ""), rng=rng,
                                                 cursor_via=cursor_via, done=set(rids))
    assert connections >= 30, f"only {connections} reconnects: the test did not exercise resume"
    if form == "session":  # nothing else happened in the session: its ids are exactly 1..N
        assert_exactly_once(collected, rids, TOKENS)
        assert [e.id for e in collected] == list(range(1, len(collected) + 1))
        reference = full_stream(stack.base_url, events_url(form, sid, ""), rids)
    else:
        reference = [e for rid in rids for e in sse(stack.base_url, events_url(form, sid, rid), timeout=20)]
    assert [(e.id, e.event, e.data) for e in collected] == [(e.id, e.event, e.data) for e in reference]


@pytest.mark.parametrize("cursor_via", ["header", "after"])
def test_resume_after_terminal_closes_request_stream(stack: Stack, cursor_via: str) -> None:
    """A resume from the terminal event or later is a 204: after a 200, even an empty one, a browser's
    EventSource reconnects for ever; a 204 stops it."""
    sid = f"end-{cursor_via}"
    first = submit(stack.base_url, sid, max_tokens=5)
    events = list(sse(stack.base_url, f"/v1/requests/{first}/events", timeout=20))
    terminal = events[-1]
    assert terminal.event == "done"
    second = submit(stack.base_url, sid, max_tokens=40)  # later events in the same session: more than a page
    list(sse(stack.base_url, f"/v1/requests/{second}/events", timeout=20))
    host, port = stack.base_url.removeprefix("http://").split(":")
    for cursor in (terminal.id, terminal.id + 3):
        began = time.monotonic()
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            if cursor_via == "header":
                connection.request("GET", f"/v1/requests/{first}/events", headers={"Last-Event-ID": str(cursor)})
            else:
                connection.request("GET", f"/v1/requests/{first}/events?after={cursor}")
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        assert (response.status, body) == (204, b""), f"not a 204 after the terminal event: {response.status} {body!r}"
        assert time.monotonic() - began < 5, "the request stream did not close after its terminal event"
    # one step before the end replays exactly the terminal event, then closes
    again = list(sse(stack.base_url, f"/v1/requests/{first}/events", last_id=terminal.id - 1, timeout=10))
    assert [(e.id, e.event) for e in again] == [(terminal.id, "done")]


def test_a_resume_past_the_end_of_a_request_just_accepted_here_is_204(stack: Stack) -> None:
    """The process that accepted a submit keeps its head a few seconds (api/recent.py) for the GET that
    follows; a client whose first GET went elsewhere (another API process, or the session's stream here)
    and then resumes here past the terminal event must get the 204, not a stream of pings for ever."""
    sid = "end-recent"
    rid = submit(stack.base_url, sid, max_tokens=3)
    events = list(sse(stack.base_url, f"/v1/sessions/{sid}/events",
                      until=lambda e: e.event in TERMINAL, timeout=20))  # leaves the request's entry untaken
    terminal = events[-1]
    assert terminal.event == "done" and terminal.data["request_id"] == rid
    host, port = stack.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", f"/v1/requests/{rid}/events", headers={"Last-Event-ID": str(terminal.id)})
        response = connection.getresponse()
        assert response.status == 204, "a 200 (the old code's: it then pinged for ever)"
        assert response.read() == b""
    finally:
        connection.close()


@pytest.fixture
def idle_stack(redis_url: str) -> Iterator[Stack]:
    """API and scheduler, no workers: requests stay queued until the test adds one."""
    running = Stack(fast_settings(redis_url)).start(workers=0)
    yield running
    running.stop()


def collect_in_background(base_url: str, path: str, last_id: int, rids: set[str]) -> tuple[threading.Thread,
                                                                                          list[SseEvent]]:
    received: list[SseEvent] = []
    pending = set(rids)

    def until(event: SseEvent) -> bool:
        if event.event in TERMINAL:
            pending.discard(event.data["request_id"])
        return not pending

    def run() -> None:
        received.extend(sse(base_url, path, last_id=last_id, until=until, timeout=30))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, received


@pytest.mark.parametrize("form", ["request", "session"])
def test_resume_while_queued_then_live(idle_stack: Stack, form: str) -> None:
    sid = f"queued-{form}"
    rid = submit(idle_stack.base_url, sid, max_tokens=30)
    path = events_url(form, sid, rid)
    (queued,) = list(sse(idle_stack.base_url, path, stop_after=1, timeout=10))
    assert queued.event == "queued"
    thread, received = collect_in_background(idle_stack.base_url, path, queued.id, {rid})
    wait_for(lambda: call("GET", f"{idle_stack.base_url}/healthz")[1]["open_streams"] >= 1, what="stream open")
    time.sleep(0.2)
    assert received == [] and call("GET", f"{idle_stack.base_url}/v1/requests/{rid}")[1]["status"] == "queued"
    idle_stack.add_worker()
    thread.join(30)
    assert not thread.is_alive(), "the resumed stream never saw the terminal event"
    assert received[0].event == "started" and received[0].id == queued.id + 1
    assert [e.data["index"] for e in received if e.event == "token"] == list(range(30))
    assert received[-1].event == "done"
    assert [e.id for e in received] == list(range(queued.id + 1, queued.id + 1 + len(received)))


def test_generation_needs_no_client(stack: Stack) -> None:
    sid = "nobody-listens"
    rids = [submit(stack.base_url, sid, max_tokens=40, prompt=f"p{i}") for i in range(2)]
    for rid in rids:
        wait_for(lambda rid=rid: call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "done",
                 timeout=30, what="generation without a client")
    for rid in rids:
        events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=10))
        assert_exactly_once(events, [rid], 40)
    session = full_stream(stack.base_url, f"/v1/sessions/{sid}/events", rids)
    assert_exactly_once(session, rids, 40)
    assert [e.id for e in session] == list(range(1, len(session) + 1))


def test_concurrent_clients_share_one_subscription(idle_stack: Stack, r: redis.Redis) -> None:
    sid = "many-eyes"
    rids = [submit(idle_stack.base_url, sid, max_tokens=60, prompt=f"q{i}") for i in range(3)]
    threads = [collect_in_background(idle_stack.base_url, f"/v1/sessions/{sid}/events", 0, set(rids))
               for _ in range(6)]
    wait_for(lambda: call("GET", f"{idle_stack.base_url}/healthz")[1]["open_streams"] == 6, what="6 streams open")
    # the per-process hub: six SSE clients, one Redis subscription to the session's channel
    assert r.pubsub_shardnumsub(keys.session_channel(sid)) == [(keys.session_channel(sid), 1)]
    idle_stack.add_worker()
    for thread, _ in threads:
        thread.join(30)
        assert not thread.is_alive(), "a client never saw the last terminal event"
    sequences = [[(e.id, e.event, e.data) for e in received] for _, received in threads]
    assert all(seq == sequences[0] for seq in sequences), "clients of one session saw different sequences"
    assert_exactly_once(threads[0][1], rids, 60)
    assert [e.id for e in threads[0][1]] == list(range(1, len(sequences[0]) + 1))


def test_cursor_past_the_session_end_is_409(stack: Stack) -> None:
    """A cursor the session never issued (or one from before it was recycled) is refused clearly,
    rather than streaming pings until ids catch up with it."""
    rid = submit(stack.base_url, "past-end", max_tokens=3)
    last = list(sse(stack.base_url, f"/v1/requests/{rid}/events", timeout=20))[-1].id
    for path in (f"/v1/requests/{rid}/events", "/v1/sessions/past-end/events"):
        code, reply = call("GET", f"{stack.base_url}{path}?after={last + 1}")
        assert code == 409 and "past the last event" in reply["error"]["message"], (path, code, reply)
        assert f"resume from {last}:" in reply["error"]["message"], reply  # the id to resume from, named
    # the terminal event's own id is no gap: nothing follows it (204, test_resume_after_terminal_closes_request_stream)
    assert call("GET", f"{stack.base_url}/v1/requests/{rid}/events?after={last}") == (204, None)
