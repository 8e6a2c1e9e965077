"""A stream whose every 200 answer is unreadable, and an API key with a control character h11 writes.

A 200 started the stream's reconnect budget afresh before its body was read, so a stream answered only by
200s whose body does not decode (a proxy's gzip header on a plain body: `bad_encoding`) or is empty
reconnected for ever; now such a 200 is no connection, and the stream gives up after `reconnect_timeout`
seconds (StreamUnavailable naming what was wrong) as one answered only 5xx does. A 200 that delivered an
event before it failed is a connection still (the budget starts afresh).

An API key was checked by h11's rule, which refuses a NUL, a line end, a vertical tab and a form feed but
writes the other control characters (`\\x01`, `\\x1b`, DEL `\\x7f`): now they are refused when the client
is built, as a line end is, without the key in the message."""

from __future__ import annotations

import asyncio
import time

import pytest

from sluicegate.client import AsyncClient, Client, InvalidArgument, StreamUnavailable
from tests.scripted_server import BAD_GZIP_STREAM, DONE_R1, Answer, event_stream, scripted

EMPTY_STREAM: Answer = (200, {"Content-Type": "text/event-stream"}, b"")
BUDGET = 0.5


def gave_up_sync(url: str) -> tuple[StreamUnavailable, float]:
    started = time.monotonic()
    with Client(url, max_backoff=0.05) as client, pytest.raises(StreamUnavailable) as gave_up:
        for _ in client.stream(request_id="r1", reconnect_timeout=BUDGET,
                               on_reconnect=lambda *_: time.monotonic() - started < 5 or pytest.fail("endless")):
            pass
    return gave_up.value, time.monotonic() - started


def gave_up_async(url: str) -> tuple[StreamUnavailable, float]:
    async def main() -> StreamUnavailable:
        async with AsyncClient(url, max_backoff=0.05) as client:
            with pytest.raises(StreamUnavailable) as gave_up:
                async for _ in client.stream(request_id="r1", reconnect_timeout=BUDGET,
                                             on_reconnect=lambda *_: time.monotonic() - started < 5
                                             or pytest.fail("endless")):
                    pass
            return gave_up.value

    started = time.monotonic()
    return asyncio.run(main()), time.monotonic() - started


@pytest.mark.parametrize("follow", [gave_up_sync, gave_up_async], ids=["sync", "async"])
@pytest.mark.parametrize(("answer", "code"), [(BAD_GZIP_STREAM, "bad_encoding"),
                                              (EMPTY_STREAM, "not_an_event_stream")], ids=["bad-gzip", "empty"])
def test_a_stream_answered_only_by_unreadable_200s_gives_up(follow, answer: Answer, code: str) -> None:
    with scripted(answer) as server:
        error, took = follow(server.url)
        assert (error.status, error.code) == (200, code)
        assert error.message.startswith("gave up after") and took < 3
        assert len(server.seen) >= 2  # retried within the budget first


def test_a_200_that_delivered_an_event_before_it_ended_was_a_connection() -> None:
    """30 answers of one event each, then only bodies that do not decode: reconnecting through the 30 takes
    longer than the budget, which each delivering 200 started afresh, so every event is read before the
    stream gives up on the bad ones."""
    answers = [event_stream((i, "token", '{"request_id": "r1", "text": "x"}')) for i in range(1, 31)]
    seen: list[int] = []
    started = time.monotonic()
    with scripted(BAD_GZIP_STREAM, *answers, BAD_GZIP_STREAM) as server, Client(server.url, max_backoff=0.05) as client:
        with pytest.raises(StreamUnavailable) as gave_up:
            for event in client.stream(request_id="r1", reconnect_timeout=BUDGET,
                                       on_reconnect=lambda *_: time.monotonic() - started < 8
                                       or pytest.fail("endless")):
                seen.append(event.id)
        assert gave_up.value.code == "bad_encoding" and seen == list(range(1, 31))
        assert time.monotonic() - started > BUDGET


def test_a_stream_still_retries_unreadable_200s_within_its_budget() -> None:
    with scripted(BAD_GZIP_STREAM, EMPTY_STREAM, BAD_GZIP_STREAM, DONE_R1) as server:
        with Client(server.url, max_backoff=0.05) as client:
            assert [event.event for event in client.stream(request_id="r1", reconnect_timeout=10)] == ["done"]
        assert len(server.seen) == 4


KEY = "sk-live-TOPSECRET-4242"


@pytest.mark.parametrize("bad", ["\x7f", "\x01", "\x1b", "\x1f", "\x08", "\x0e"])
def test_a_key_with_a_control_character_h11_writes_is_refused_unnamed(bad: str) -> None:
    key = KEY.replace("-", bad, 1)
    with scripted(DONE_R1) as server:
        for kind in (Client, AsyncClient):
            with pytest.raises(InvalidArgument) as refused:
                kind(server.url, api_key=key)
            assert refused.value.code == "invalid_request" and "position 2 of 22" in refused.value.message
            assert "control character" in refused.value.message
            assert "TOPSECRET" not in str(refused.value) and "TOPSECRET" not in refused.value.message
        assert server.seen == []
