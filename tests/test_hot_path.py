"""The resumable route's hot path (api/hot_path.py) answers as FastAPI does: the same 202, the same
errors (an unusual body is handed to FastAPI, replayed), the same event-stream headers; a request
just submitted streams without a read of its head, and a head lost from the store falls back to it."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import uvicorn

from sluicegate.api.recent import READER_MAX_AGE, Accepted, RecentSubmits
from sluicegate.embedded import free_port
from sluicegate.sessions import keys
from sluicegate.sessions.hub import Reader
from sluicegate.sessions.store import LogBounds
from tests.helpers import Stack, call, sse, submit, wait_for

BAD_BODIES = [b'{"prompt": "x", "max_tokens": 0}', b'{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
              b"{not json", b"[]", b"", b'{"prompt": "x", "max_tokens": 1, "tenant": "no spaces"}',
              b'{"prompt": "x", "max_tokens": NaN}']


@contextmanager
def fastapi_path(stack: Stack) -> Iterator[str]:
    """The base URL of a second API server on `stack`'s settings and loop whose requests carry a root_path,
    which api/hot_path.py declines: every request there goes through FastAPI's routes."""
    from sluicegate.api.app import create_app
    from sluicegate.api.joined_writes import JoinedWritesProtocol

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(stack.settings), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False, lifespan="on",
                                           http=JoinedWritesProtocol, root_path="/r"))
    serving = asyncio.run_coroutine_threadsafe(server.serve(), stack.loop)
    try:
        wait_for(lambda: server.started or serving.done(), timeout=15, what="the FastAPI-only server")
        assert server.started, serving.result()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        serving.result(15)


def test_bad_submits_get_fastapis_own_answers(stack: Stack) -> None:
    # application/json takes the hot path (and is handed back to FastAPI); a +json type goes to FastAPI
    # directly: both must answer the same.
    for raw in BAD_BODIES:
        hot = call("POST", f"{stack.base_url}/v1/sessions/hp-1/requests", raw=raw)
        plain = call("POST", f"{stack.base_url}/v1/sessions/hp-1/requests", raw=raw,
                     headers={"content-type": "application/vnd.api+json"})
        assert hot == plain and hot[0] == 422, (raw, hot, plain)
    code, reply = call("POST", f"{stack.base_url}/v1/sessions/bad%20id/requests", {"prompt": "x"})
    assert code == 422 and "session_id" in reply["error"]["message"]


def test_submit_then_stream_through_the_hot_path(stack: Stack) -> None:
    rid = submit(stack.base_url, "hp-2", max_tokens=5)
    events = list(sse(stack.base_url, f"/v1/requests/{rid}/events"))
    assert [e.event for e in events][0] == "queued" and events[-1].event == "done"
    assert [e.data["index"] for e in events if e.event == "token"] == list(range(5))
    again = list(sse(stack.base_url, f"/v1/requests/{rid}/events", last_id=events[1].id))  # a resume: read
    assert [e.id for e in again] == [e.id for e in events[2:]]
    code, reply = call("GET", f"{stack.base_url}/v1/requests/{rid[:2]}nope/events")
    assert code == 404 and reply["error"]["type"] == "not_found"


def test_event_streams_keep_sse_starlettes_headers(stack: Stack) -> None:
    rid = submit(stack.base_url, "hp-3", max_tokens=1)
    host, port = stack.base_url.removeprefix("http://").split(":")
    for path in (f"/v1/requests/{rid}/events", "/v1/sessions/hp-3/events?after=0"):
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
        assert response.getheader("cache-control") == "no-store"
        assert response.getheader("connection") == "keep-alive"
        assert response.getheader("x-accel-buffering") == "no"
        connection.close()  # a session's stream never ends
    code, reply = call("GET", f"{stack.base_url}/v1/requests/{rid}/events", headers={"Last-Event-ID": "x"})
    assert code == 422 and json.dumps(reply).count("Last-Event-ID") == 1


def test_recent_submits_are_taken_once_and_age_out() -> None:
    now = [0.0]
    left: list[tuple[str, Reader]] = []
    recent = RecentSubmits(session_ttl=8, clock=lambda: now[0], leave=lambda sid, reader: left.append((sid, reader)))
    recent.note("r1", "s", "t", 7)
    assert recent.take("r1") == Accepted({"sid": "s", "tn": "t", "fs": "7"}) and recent.take("r1") is None
    recent.note("r2", "s", "t", 8)
    now[0] = 4.5  # past half the session TTL
    assert recent.take("r2") is None
    # a reader is handed to the GET that takes it; one nobody takes is given back after READER_MAX_AGE
    taken, untaken = Reader(8), Reader(8)

    async def readers() -> None:
        recent.note("r3", "s3", "t", 9, taken)
        recent.note("r4", "s4", "t", 10, untaken)
        assert recent.take("r3") == Accepted({"sid": "s3", "tn": "t", "fs": "9"}, taken) and left == []
        now[0] += READER_MAX_AGE + 0.1
        assert recent.take("r4") == Accepted({"sid": "s4", "tn": "t", "fs": "10"}) and left == [("s4", untaken)]

    asyncio.run(readers())


def test_a_first_event_lost_in_a_restart_is_not_held() -> None:
    bounds = LogBounds(last_id=20, oldest_kept=1, holes=((10, 15),))
    assert bounds.holds(10) and bounds.holds(15) and bounds.holds(20)
    assert not bounds.holds(12) and not bounds.holds(21) and not bounds.holds(0)


def test_integers_at_the_64_bit_edges_are_stored_exactly_on_both_paths(stack: Stack, r: redis.Redis) -> None:
    # orjson reads those past 64 bits as floats; the hot path hands such a body to FastAPI, whose json.loads keeps
    # them: exact up to the edges the engine's encoder can send (-2^63 .. 2^64 - 1), a 422 naming them past those
    params = {"seed": 2**64 - 1, "low": -(2**63), "fits": 2**63 - 1, "ts": 1733000000000000000}
    with fastapi_path(stack) as other:
        for base in (stack.base_url, other):
            code, reply = call("POST", f"{base}/v1/sessions/hp-big/requests",
                               {"prompt": "x", "max_tokens": 1, "params": params})
            assert code == 202, reply
            stored = r.hget(keys.request(reply["request_id"]), "pa")
            assert json.loads(stored) == params and "e+" not in stored, (base, stored)
            for name, past in (("seed", 2**64), ("low", -(2**63) - 1)):
                code, reply = call("POST", f"{base}/v1/sessions/hp-big/requests",
                                   {"prompt": "x", "max_tokens": 1, "params": {**params, name: past}})
                assert (code, reply["error"]["message"].split(":")[0]) == (422, f"params.{name}"), (base, reply)


def test_a_streamed_chat_answer_sends_the_event_streams_headers(stack: Stack) -> None:
    # nginx buffers a text/event-stream answer without X-Accel-Buffering: no
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
    with fastapi_path(stack) as other:
        for base in (stack.base_url, other):
            host, port = base.removeprefix("http://").split(":")
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and response.read().endswith(b"data: [DONE]\n\n")
            assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
            assert response.getheader("cache-control") == "no-store"
            assert response.getheader("connection") == "keep-alive"
            assert response.getheader("x-accel-buffering") == "no", base
            assert response.getheader("x-request-id")
            connection.close()
