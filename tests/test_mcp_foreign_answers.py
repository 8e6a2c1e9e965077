"""MCP tools against answers that are not the API's, keep-alives read as events, and secrets: `inspect_session`
kept each keep-alive ping as an event `{"id": <the last id>, "event": "message", "data": {}}` (httpx-sse keeps
the last event id, so a ping has one) when pings come faster than its 0.5 s idle wait, filling `max_events`
with them; `set_weight` answered `{"ok": true}` by a catch-all was no error; an API key with a line end went
to the assistant in the tool's error."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from sluicegate.client import AsyncClient, SluicegateError
from sluicegate.mcp_server import _recent_events
from tests.helpers import Stack, fast_settings, submit, wait_for
from tests.scripted_server import BAD_GZIP_503, BAD_GZIP_STREAM, JSON_OK, Answer, scripted

pytest.importorskip("mcp", reason="the mcp extra is not installed (pip install -e '.[mcp]'; ./dev installs it)")

from tests.test_mcp import Tools, run_with_tools, status_of  # noqa: E402


@pytest.fixture
def pinging_stack(redis_url: str) -> Iterator[Stack]:
    """A stack whose idle SSE streams get a keep-alive every 0.1 s (`--sse-ping-seconds 0.1`)."""
    running = Stack(fast_settings(redis_url, sse_ping_seconds=0.1)).start(workers=1)
    yield running
    running.stop()


def test_inspect_session_keeps_no_keep_alive_as_an_event(pinging_stack: Stack) -> None:
    base = pinging_stack.base_url
    rid = submit(base, "pinged", max_tokens=3)
    wait_for(lambda: status_of(base, rid) == "done", timeout=10, what="the request to end")

    async def main() -> tuple[list[dict[str, object]], dict[str, int]]:
        async with AsyncClient(base) as client:
            events, tokens = await _recent_events(client, "pinged", 3)
            return events, dict(tokens)

    events, tokens = asyncio.run(main())
    # the last 3 events are the log's last 3, not 3 pings read after them (was [{"event": "message"}] * 3)
    assert [e["event"] for e in events] == ["queued", "started", "done"], events
    assert tokens == {rid: 3}

    async def body(tools: Tools) -> None:
        seen = await tools.call("inspect_session", session_id="pinged")
        assert [e["event"] for e in seen["events"]][-3:] == ["queued", "started", "done"], seen["events"]
        assert "message" not in {e["event"] for e in seen["events"]}
        ids = [e["id"] for e in seen["events"]]
        assert ids == sorted(set(ids))

    run_with_tools(base, body)


def test_inspect_session_of_a_foreign_stream_skips_pings_and_repeats() -> None:
    """The reviewer's case on a raw stream: one event, then pings (a comment each) and a repeated id."""
    answer: Answer = (200, {"Content-Type": "text/event-stream"},
                      b'id: 7\nevent: done\ndata: {"request_id": "r"}\n\n' + b": ping\n\n" * 4
                      + b'id: 7\nevent: done\ndata: {"request_id": "r"}\n\n' + b"data: {}\n\n")

    async def main(url: str) -> list[dict[str, object]]:
        async with AsyncClient(url) as client:
            return (await _recent_events(client, "s", 30))[0]

    with scripted(answer) as server:
        assert asyncio.run(main(server.url)) == [{"id": 7, "event": "done", "data": {"request_id": "r"}}]


def test_inspect_session_of_a_body_that_does_not_decode_is_one_error() -> None:
    async def main(url: str) -> SluicegateError:
        async with AsyncClient(url) as client:
            with pytest.raises(SluicegateError) as refused:
                await _recent_events(client, "s", 30)
            return refused.value

    with scripted(BAD_GZIP_STREAM) as server:
        assert asyncio.run(main(server.url)).code == "bad_encoding"
    with scripted(BAD_GZIP_503) as server:
        assert asyncio.run(main(server.url)).status == 503


def test_a_tool_answered_by_a_catch_all_is_an_error() -> None:
    async def body(tools: Tools) -> None:
        for name, arguments in (("set_weight", {"tenant": "t", "weight": 2.0}), ("stats", {}),
                                ("set_quota", {"group": "default", "burst": 3}), ("set_quota", {"group": "default"})):
            assert "not_the_api" in await tools.refused(name, **arguments), name

    with scripted(JSON_OK) as server:
        run_with_tools(server.url, body)


def test_a_key_with_a_line_end_is_not_given_to_the_assistant() -> None:
    async def body(tools: Tools) -> None:
        refused = await tools.refused("stats")
        assert "TOPSECRET" not in refused and "API key" in refused, refused

    with scripted(JSON_OK) as server:
        run_with_tools(server.url, body, env={"SLUICEGATE_API_KEY": "sk-TOPSECRET\n"})
        assert server.seen == []
