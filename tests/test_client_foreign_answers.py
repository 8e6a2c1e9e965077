"""Answers that are not the API's, as a proxy or another web app at the client's URL gives them: a 200 that
is no event stream ends a stream at once (`not_an_event_stream`) instead of reconnecting for ever; a 200
that is not JSON is an answer refused (`not_json`, exit 1), not input that "cannot be sent" (exit 2); and a
proxy's 5xx of its own (520-524: the origin down or slow) is retried as the 502-504 are."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from sluicegate.client import AsyncClient, Client, SluicegateError
from tests.helpers import run_sluicegate

HTML = (200, "text/html", b"<html><body>Welcome to the dev server</body></html>")
DONE = (200, "text/event-stream", b'id: 7\nevent: done\ndata: {"request_id": "r1", "status": "done"}\n\n')


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers every request with the next of `answers` (the last one again once they run out) and
    counts the requests it got."""

    answers: list[tuple[int, str, bytes]] = [HTML]
    hits = 0

    def _answer(self) -> None:
        cls = type(self)
        status, kind, body = cls.answers[min(cls.hits, len(cls.answers) - 1)]
        cls.hits += 1
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[type[Scripted]]:
    """The server's handler class (set its `answers`); its URL is `scripted.url`."""
    handler = type("ScriptedHere", (Scripted,), {"answers": [HTML], "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler
    server.shutdown()
    server.server_close()


sg = run_sluicegate


@pytest.mark.parametrize("target", [{"request_id": "r1"}, {"session_id": "s1"}])
def test_a_200_page_that_is_no_event_stream_ends_the_stream_at_once(scripted: type[Scripted],
                                                                    target: dict[str, str]) -> None:
    """It was caught as a transport error (httpx-sse's SSEError is one) after the 200 had reset the
    reconnect clock: reconnects for ever, whatever reconnect_timeout said."""
    started = time.monotonic()
    with Client(scripted.url) as client, pytest.raises(SluicegateError) as refused:  # type: ignore[attr-defined]
        list(client.stream(reconnect_timeout=2, **target))
    assert (refused.value.status, refused.value.code) == (200, "not_an_event_stream")
    assert "text/html" in refused.value.message
    assert scripted.hits == 1 and time.monotonic() - started < 2


def test_the_async_stream_ends_at_once_too(scripted: type[Scripted]) -> None:
    async def main() -> None:
        async with AsyncClient(scripted.url) as client:  # type: ignore[attr-defined]
            with pytest.raises(SluicegateError) as refused:
                async for _ in client.stream(request_id="r1", reconnect_timeout=2):
                    pass
            assert refused.value.code == "not_an_event_stream"

    asyncio.run(main())
    assert scripted.hits == 1


def test_a_streamed_chat_answered_by_a_page_says_so(scripted: type[Scripted]) -> None:
    """Was `no_answer` ("sent, but no answer came"): an answer came, and it was not an event stream."""
    with Client(scripted.url) as client, pytest.raises(SluicegateError) as refused:  # type: ignore[attr-defined]
        list(client.chat([{"role": "user", "content": "hi"}], stream=True))
    assert refused.value.code == "not_an_event_stream"


def test_tail_of_a_page_that_is_no_event_stream_exits_1(scripted: type[Scripted]) -> None:
    result = sg("tail", "s1", "--reconnect-timeout", "30", "--url", scripted.url)  # type: ignore[attr-defined]
    assert result.returncode == 1 and "not_an_event_stream" in result.stderr, result.stderr
    assert scripted.hits == 1


@pytest.mark.parametrize("status", [520, 521, 522, 523, 524, 507])
def test_a_proxys_own_5xx_is_retried_as_a_502_is(scripted: type[Scripted], status: int) -> None:
    scripted.answers = [(status, "text/html", b"<html>origin down</html>")] * 2 + [DONE]
    with Client(scripted.url) as client:  # type: ignore[attr-defined]
        events = list(client.stream(request_id="r1", reconnect_timeout=30))
    assert [event.event for event in events] == ["done"] and scripted.hits == 3


@pytest.mark.parametrize("status", [501, 505])
def test_a_5xx_that_never_heals_is_raised_at_once(scripted: type[Scripted], status: int) -> None:
    scripted.answers = [(status, "text/plain", b"no")]
    with Client(scripted.url) as client, pytest.raises(SluicegateError) as refused:  # type: ignore[attr-defined]
        list(client.stream(request_id="r1", reconnect_timeout=30))
    assert refused.value.status == status and scripted.hits == 1


def test_a_200_that_is_not_json_is_an_answer_refused(scripted: type[Scripted]) -> None:
    with Client(scripted.url) as client:  # type: ignore[attr-defined]
        for call in (lambda: client.submit("s1", "hi"), client.stats,
                     lambda: client.chat([{"role": "user", "content": "hi"}])):
            with pytest.raises(SluicegateError) as refused:
                call()
            assert (refused.value.status, refused.value.code) == (200, "not_json")
            assert "Welcome to the dev server" in refused.value.message

    async def main() -> None:
        async with AsyncClient(scripted.url) as client:  # type: ignore[attr-defined]
            with pytest.raises(SluicegateError) as refused:
                await client.submit("s1", "hi")
            assert refused.value.code == "not_json"

    asyncio.run(main())


@pytest.mark.parametrize("args", [("submit", "s1", "hi"), ("stats",)])
def test_the_cli_answered_by_a_page_exits_1_not_as_a_usage_error(scripted: type[Scripted],
                                                                 args: tuple[str, ...]) -> None:
    result = sg(*args, "--url", scripted.url)  # type: ignore[attr-defined]
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "not_json" in result.stderr and "cannot send this" not in result.stderr

