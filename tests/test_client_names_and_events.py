"""The client (sluicegate/client/) with names and events at their edges: the names "." and ".." that the
server accepts for a session, a tenant or a group (as URL path segments they are dot segments, which a URL
resolver removes), against a real stack; and an event whose data is not JSON (an event cut on the way: httpx-sse
before 0.4.2 split lines on U+2028), from a small HTTP server of the test's own, which must be a
SluicegateError like every failure of the client, with the resume cursor left before that event."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator

import pytest
from httpx_sse import ServerSentEvent

from sluicegate.client import AsyncClient, Client, SluicegateError
from sluicegate.client.follow import _Follow
from tests.helpers import Stack, call

GOOD = b'id: 1\nevent: queued\ndata: {"request_id": "r1"}\n\n'
CUT = b'id: 2\nevent: token\ndata: {"request_id": "r1", "index": 0, "text": "a\n\n'  # cut where U+2028 was
CHAT_CUT = b'data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "a\n\n'


def test_a_session_named_dot_dot_is_submitted_to_and_streamed(stack: Stack) -> None:
    with Client(stack.base_url) as client:
        for name in ("..", "."):
            sub = client.submit(name, "hi", max_tokens=3)
            assert sub.session_id == name
            seen = []
            for event in client.stream(session_id=name):
                seen.append(event)
                if event.event == "done":
                    break
            assert {e.request_id for e in seen} == {sub.request_id}
            assert [e.event for e in seen][0] == "queued" and [e.index for e in seen if e.event == "token"] == [0, 1, 2]
            assert [e.event for e in client.stream(request_id=sub.request_id)][-1] == "done"
        assert client.request(sub.request_id)["session_id"] == "."


def test_a_tenant_named_dot_gets_its_weight(stack: Stack) -> None:
    with Client(stack.base_url) as client:
        client.set_weight(".", 2.5)
        client.set_weight("..", 4.0)
        weights = {t["tenant"]: t["weight"] for t in client.tenants()}
    assert weights["."] == 2.5 and weights[".."] == 4.0
    _, direct = call("GET", f"{stack.base_url}/v1/admin/tenants")
    assert {t["tenant"]: t["weight"] for t in direct["tenants"]}["."] == 2.5


def test_the_async_client_reaches_a_session_named_dot_dot(stack: Stack) -> None:
    async def main() -> list[str]:
        async with AsyncClient(stack.base_url) as client:
            sub = await client.submit("..", "hi", max_tokens=2)
            await client.set_weight(".", 3.0)
            names = []
            async for event in client.stream(session_id=".."):
                names.append(event.event)
                if event.event == "done":
                    break
            assert sub.session_id == ".."
            return names

    assert asyncio.run(asyncio.wait_for(main(), 30))[-1] == "done"


class BrokenEvents(http.server.BaseHTTPRequestHandler):
    """A session stream with one good event, then one whose data was cut mid-string; a chat stream likewise."""

    def _stream(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._stream(GOOD + CUT)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._stream(CHAT_CUT)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def broken_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BrokenEvents)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_event_whose_data_is_not_json_is_a_sluicegate_error(broken_url: str) -> None:
    with Client(broken_url, reconnect_timeout=2) as client:
        events = client.stream(session_id="s")
        assert next(events).event == "queued"
        with pytest.raises(SluicegateError) as bad:
            next(events)
        assert (bad.value.status, bad.value.code) == (200, "bad_event") and "id 2" in bad.value.message
        with pytest.raises(SluicegateError) as bad_chunk:
            list(client.chat([{"role": "user", "content": "hi"}], stream=True))
        assert bad_chunk.value.code == "bad_event"


def test_the_async_client_raises_the_same_for_an_event_that_is_not_json(broken_url: str) -> None:
    async def main() -> None:
        async with AsyncClient(broken_url, reconnect_timeout=2) as client:
            events = client.stream(session_id="s")
            assert (await anext(events)).event == "queued"
            with pytest.raises(SluicegateError) as bad:
                await anext(events)
            assert bad.value.code == "bad_event"
            stream = await client.chat([{"role": "user", "content": "hi"}], stream=True)
            with pytest.raises(SluicegateError) as bad_chunk:
                [chunk async for chunk in stream]
            assert bad_chunk.value.code == "bad_event"

    asyncio.run(asyncio.wait_for(main(), 30))


def test_the_cursor_stays_before_an_event_that_could_not_be_read() -> None:
    """A caller that resumes from the cursor gets the event again, not the events after it only."""
    follow = _Follow("/v1/sessions/s/events", request_id=None, after=None, reconnect_timeout=1, max_backoff=1,
                     on_reconnect=None)
    assert follow.accept(ServerSentEvent(event="queued", data='{"request_id": "r1"}', id="1")) is not None
    with pytest.raises(SluicegateError):
        follow.accept(ServerSentEvent(event="token", data='{"request_id": "r1", "text": "a', id="2"))
    assert follow.last_id == 1
    with pytest.raises(SluicegateError, match="not a JSON object"):
        follow.accept(ServerSentEvent(event="token", data="[1, 2]", id="2"))
    assert follow.last_id == 1
