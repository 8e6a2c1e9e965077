"""The chat route on a session the API process already follows (a client that names its session): its
reader joins before the submit, so the request's events all come live and the stream reads no log.
Whatever the reader misses (the subscriber's connection lost meanwhile) sends it to the log, and the
answer is still whole, in order, once."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.api.recent import READER_MAX_AGE
from sluicegate.api.services import Services
from sluicegate.sessions import keys
from sluicegate.workers.engines.sim import prompt_of, sim_text
from tests.helpers import SseEvent, Stack, sse, submit, wait_for
from tests.openai_helpers import chat_stream
from tests.worker_helpers import token_text

MESSAGES = [{"role": "user", "content": "follow me"}]


@pytest.fixture
def log_reads(stack: Stack) -> Iterator[list[str]]:
    """The session log reads of the stack's API, by session, as they are made (each one still runs:
    `read_page` is the one call to Redis that every log read goes through)."""
    svc: Services = stack._server.config.app.state.services  # noqa: SLF001
    store, made = svc.store, []
    read_page = store.read_page

    async def counted(sid: str, *args: Any, **kwargs: Any) -> Any:
        made.append(sid)
        return await read_page(sid, *args, **kwargs)

    store.read_page = counted  # type: ignore[method-assign]
    yield made
    store.read_page = read_page  # type: ignore[method-assign]


def whole_answer(stack: Stack, session: str, max_tokens: int) -> None:
    result = chat_stream(stack.base_url, {"messages": MESSAGES, "max_tokens": max_tokens, "stream": True},
                         {"X-Session-Id": session})
    assert result.status == 200 and result.done
    assert result.text == sim_text(prompt_of(MESSAGES), max_tokens), "each token once, in order"
    assert result.chunks[-1]["choices"][0]["finish_reason"] == "length"


def whole_message(stack: Stack, session: str, max_tokens: int) -> None:
    host, port = stack.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps({"messages": MESSAGES, "max_tokens": max_tokens}),
                           {"content-type": "application/json", "X-Session-Id": session})
        response = connection.getresponse()
        assert response.status == 200
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert answer["choices"][0]["message"]["content"] == sim_text(prompt_of(MESSAGES), max_tokens)


def test_a_followed_sessions_next_request_streams_without_reading_the_log(stack: Stack, log_reads: list[str]) -> None:
    whole_answer(stack, "followed-1", 6)
    assert log_reads == ["followed-1"], "a session not followed yet: joined after the submit, then the log read"
    whole_answer(stack, "followed-1", 6)
    whole_message(stack, "followed-1", 5)
    whole_answer(stack, "followed-1", 7)
    assert log_reads == ["followed-1"], "followed: every event came live, no log read"
    whole_answer(stack, "followed-2", 4)
    assert log_reads == ["followed-1", "followed-2"]


def subscriber_connections(r: redis.Redis) -> list[tuple[redis.Redis, int]]:
    """(node, client id) of every connection subscribed to shard channels, on each master."""
    nodes = ([r.get_redis_connection(node) for node in r.get_primaries()] if isinstance(r, RedisCluster) else [r])
    return [(node, int(c["id"])) for node in nodes for c in node.client_list() if int(c.get("ssub", 0)) > 0]


def test_a_reader_that_joined_live_and_missed_events_still_streams_the_whole_answer(stack: Stack,
                                                                                     r: redis.Redis) -> None:
    whole_answer(stack, "followed-3", 4)
    for _ in range(5):  # the connection dies around the submit: its events are lost to pub/sub
        killed = subscriber_connections(r)
        assert killed, "the API's subscriber follows the session"
        for node, client_id in killed:
            node.client_kill_filter(_id=client_id)
        whole_answer(stack, "followed-3", 8)  # resubscribed, the hub sends the reader to the log


def resumable(stack: Stack, session: str, max_tokens: int, last_event_id: int | None = None) -> list[SseEvent]:
    """Submit, then GET the request's events (the resumable route); every token once, in order."""
    rid = submit(stack.base_url, session, prompt="follow me too", max_tokens=max_tokens)
    events = list(sse(stack.base_url, f"/v1/requests/{rid}/events", last_id=last_event_id, timeout=30))
    assert [e.event for e in events][-1] == "done"
    return events


def test_the_resumable_route_on_a_followed_session_reads_no_log(stack: Stack, log_reads: list[str]) -> None:
    """The submit takes a reader of the session's channel before it writes (api/recent.py): the GET that
    follows streams the request from it. A GET with a cursor (a resume) reads the log, as always."""
    first = resumable(stack, "followed-sse", 6)
    assert log_reads == ["followed-sse"], "a session not followed yet: the GET joins, then reads the log"
    for max_tokens in (5, 7, 3):
        events = resumable(stack, "followed-sse", max_tokens)
        assert [e.event for e in events] == ["queued", "started", *["token"] * max_tokens, "done"]
        assert token_text(events) == sim_text("follow me too", max_tokens)
        assert [e.id for e in events] == list(range(events[0].id, events[0].id + max_tokens + 3)), "none twice"
    assert log_reads == ["followed-sse"], "followed: every event came live"
    resumed = resumable(stack, "followed-sse", 4, last_event_id=first[-1].id)  # the log from the first's end
    assert len(log_reads) > 1 and set(log_reads) == {"followed-sse"}
    assert token_text(resumed) == sim_text("follow me too", 4)
    svc: Services = stack._server.config.app.state.services  # noqa: SLF001
    channel = svc.hub._channels[keys.session_channel("followed-sse")]  # noqa: SLF001
    wait_for(lambda: not channel.readers and not svc.recent.readers, what="every reader left, the resume's too")


def test_a_reader_the_get_never_takes_is_given_back(stack: Stack) -> None:
    """A submit on a followed session whose events nobody GETs: its reader leaves the hub in time, and the
    session's channel is left once it has no reader (after the hub's linger)."""
    resumable(stack, "followed-untaken", 2)
    svc: Services = stack._server.config.app.state.services  # noqa: SLF001
    channel = svc.hub._channels[keys.session_channel("followed-untaken")]  # noqa: SLF001
    wait_for(lambda: not channel.readers, what="the first stream gone")
    submit(stack.base_url, "followed-untaken", prompt="nobody reads me", max_tokens=2)
    assert len(channel.readers) == 1 and len(svc.recent.readers) == 1, "the submit's reader waits for its GET"
    wait_for(lambda: not svc.recent.readers and not channel.readers, timeout=READER_MAX_AGE + 5,
             what="the untaken reader given back, with no other call to the process")
