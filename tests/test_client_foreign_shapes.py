"""Answers that are not the API's though they look like successes, from a proxy or a catch-all route at the
client's URL: a 3xx (redirects are not followed) is an error answer as a 4xx is (`http_301`), a 2xx JSON of
another shape is `not_the_api`, and a body that does not decode as its Content-Encoding says is
`bad_encoding` (an error status's: the status alone, so a 503 stays a retried 503). They were tracebacks
(TypeError, KeyError, AttributeError, httpx.DecodingError) or false successes (`weight` printed the weight
it set, exit 0; MCP `set_weight` was no error)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from sluicegate.client import AsyncClient, Client, SluicegateError
from tests.helpers import run_sluicegate
from tests.scripted_server import (
    BAD_GZIP_200,
    BAD_GZIP_503,
    BAD_GZIP_STREAM,
    DONE_R1,
    EMPTY_301,
    JSON_LIST,
    JSON_OK,
    Answer,
    scripted,
)

sg = run_sluicegate
CALLS: dict[str, Callable[[Client], Any]] = {
    "submit": lambda c: c.submit("s1", "hi"),
    "request": lambda c: c.request("r1"),
    "cancel": lambda c: c.cancel("r1"),
    "set_weight": lambda c: c.set_weight("t", 2),
    "set_tenant": lambda c: c.set_tenant("t", max_streams=3),
    "set_quota": lambda c: c.set_quota("default", burst=3),
    "groups": lambda c: c.groups(),
    "tenants": lambda c: c.tenants(),
    "stats": lambda c: c.stats(),
    "chat": lambda c: c.chat([{"role": "user", "content": "hi"}]),
}


def refusal(answer: Answer, call: Callable[[Client], Any]) -> SluicegateError:
    with scripted(answer) as server, Client(server.url) as client, pytest.raises(SluicegateError) as refused:
        call(client)
    return refused.value


@pytest.mark.parametrize("name", CALLS)
def test_a_redirect_with_no_body_is_an_error_answer(name: str) -> None:
    """Was a success with no body: TypeError/AttributeError tracebacks, or `chat` returning None."""
    refused = refusal(EMPTY_301, CALLS[name])
    assert (refused.status, refused.code) == (301, "http_301")
    assert "https://127.0.0.1:1/elsewhere" in refused.message


NGINX_PAGE = (b"<html>\r\n<head><title>301 Moved Permanently</title></head>\r\n<body>\r\n<center><h1>301 Moved "
              b"Permanently</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
NGINX_301: Answer = (301, {"Location": "https://bob:hunter2@sg.example.internal/v1/admin/stats",
                           "Content-Type": "text/html"}, NGINX_PAGE)


@pytest.mark.parametrize("name", CALLS)
def test_a_redirect_with_a_page_says_where_it_leads(name: str) -> None:
    """nginx's 301 has an HTML page: the message was that page's line, with no word of where it led."""
    refused = refusal(NGINX_301, CALLS[name])
    assert (refused.status, refused.code) == (301, "http_301")
    assert "redirected to https://sg.example.internal/v1/admin/stats" in refused.message, refused.message
    assert "hunter2" not in str(refused) and "not followed" in refused.message


def test_the_cli_and_the_async_client_say_where_a_redirect_leads() -> None:
    with scripted(NGINX_301) as server:
        result = sg("stats", "--url", server.url)

        async def main() -> None:
            async with AsyncClient(server.url) as client:
                with pytest.raises(SluicegateError) as refused:
                    await client.set_weight("t", 2)
                assert "redirected to https://sg.example.internal/" in refused.value.message

        asyncio.run(main())
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "http_301" in result.stderr and "https://sg.example.internal/v1/admin/stats" in result.stderr
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize("answer", [JSON_OK, JSON_LIST], ids=["ok", "list"])
@pytest.mark.parametrize("name", CALLS)
def test_a_2xx_of_another_shape_is_not_the_api(name: str, answer: Answer) -> None:
    """Was `{"ok": true}` returned as the answer (set_weight, stats, ...), KeyError 'request_id' / 'groups',
    or AttributeError on a list."""
    refused = refusal(answer, CALLS[name])
    assert (refused.status, refused.code) == (200, "not_the_api")
    assert answer[2].decode() in refused.message


def test_the_async_client_checks_the_shape_too() -> None:
    async def main(url: str) -> None:
        async with AsyncClient(url) as client:
            for call in (lambda: client.set_weight("t", 2), lambda: client.submit("s1", "hi"), client.groups,
                         client.stats, lambda: client.chat([{"role": "user", "content": "hi"}])):
                with pytest.raises(SluicegateError) as refused:
                    await call()
                assert refused.value.code == "not_the_api"

    with scripted(JSON_OK) as server:
        asyncio.run(main(server.url))
    with scripted(EMPTY_301) as server:
        async def redirected() -> None:
            async with AsyncClient(server.url) as client:
                with pytest.raises(SluicegateError) as refused:
                    await client.submit("s1", "hi")
                assert refused.value.code == "http_301"

        asyncio.run(redirected())


@pytest.mark.parametrize("answer", [JSON_OK, JSON_LIST, EMPTY_301], ids=["ok", "list", "301"])
@pytest.mark.parametrize("args", [("weight", "t", "2"), ("submit", "s1", "hi"), ("quota", "default"),
                                  ("quota", "default", "--burst", "3"), ("stats",), ("stats", "--json")])
def test_the_cli_says_so_in_one_line_exit_1(args: tuple[str, ...], answer: Answer) -> None:
    """`weight t 2` against `{"ok": true}` printed "tenant t: weight 2.0", exit 0."""
    with scripted(answer) as server:
        result = sg(*args, "--url", server.url)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert ("http_301" if answer is EMPTY_301 else "not_the_api") in result.stderr


def test_a_body_that_does_not_decode_is_bad_encoding() -> None:
    """Was httpx.DecodingError (a RequestError, not the TransportError the client catches): a traceback."""
    for name in ("stats", "submit", "chat"):
        refused = refusal(BAD_GZIP_200, CALLS[name])
        assert (refused.status, refused.code) == (200, "bad_encoding"), name
    refused = refusal(BAD_GZIP_503, CALLS["stats"])  # an error answer: its status alone
    assert (refused.status, refused.code) == (503, "unavailable")
    with scripted(BAD_GZIP_STREAM) as server, Client(server.url) as client:
        chat = client.chat([{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(SluicegateError) as refused_chat:
            list(chat)
        assert refused_chat.value.code == "bad_encoding"

    async def main(url: str) -> None:
        async with AsyncClient(url) as client:
            with pytest.raises(SluicegateError) as refused:
                await client.stats()
            assert refused.value.code == "bad_encoding"

    with scripted(BAD_GZIP_200) as server:
        asyncio.run(main(server.url))


@pytest.mark.parametrize("bad", [BAD_GZIP_503, BAD_GZIP_STREAM], ids=["503", "200-stream"])
def test_a_stream_retries_a_body_that_does_not_decode_as_a_5xx(bad: Answer) -> None:
    with scripted(bad, bad, DONE_R1) as server, Client(server.url, max_backoff=0.05) as client:
        events = list(client.stream(request_id="r1", reconnect_timeout=10))
        assert [event.event for event in events] == ["done"] and len(server.seen) == 3

    async def main(url: str) -> list[str]:
        async with AsyncClient(url, max_backoff=0.05) as client:
            return [event.event async for event in client.stream(request_id="r1", reconnect_timeout=10)]

    with scripted(bad, bad, DONE_R1) as server:
        assert asyncio.run(main(server.url)) == ["done"] and len(server.seen) == 3


def test_the_cli_on_a_503_that_does_not_decode() -> None:
    """`stats`: one line, exit 1 (was a traceback); `submit --follow` reconnects past it (was a traceback)."""
    with scripted(BAD_GZIP_503) as server:
        result = sg("stats", "--url", server.url)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "503" in result.stderr
    submitted: Answer = (202, {"Content-Type": "application/json"},
                         b'{"request_id": "r1", "session_id": "s1", "status": "queued"}')
    with scripted(submitted, BAD_GZIP_503, DONE_R1) as server:
        result = sg("submit", "s1", "hi", "--follow", "--reconnect-timeout", "10", "--url", server.url)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "reconnecting" in result.stderr
