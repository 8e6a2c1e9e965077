"""Secrets stay out of the client's messages, which end up on terminals, in logs and in an assistant's context
(MCP). An API key with a stray line end (pasted, or read from a file with its newline) made h11 refuse the
header with a message quoting it, which the client called `no_answer` ("sent, ... may have taken effect"),
`tail` retried and printed on every reconnect line, and MCP passed to the assistant; now the client refuses
it when built, without quoting it (the CLI: a usage error, exit 2). A request that cannot be written at all
is `not_sent`, never retried. A URL's userinfo password is never named."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from sluicegate.client import AsyncClient, Client, InvalidArgument, SluicegateError
from sluicegate.embedded import free_port
from tests.helpers import run_sluicegate
from tests.scripted_server import DONE_R1, JSON_OK, scripted

sg = run_sluicegate
KEY = "sk-live-TOPSECRET-4242"


@pytest.mark.parametrize("key", [KEY + "\n", KEY + "\r\n", "\t" + KEY, KEY + " ", f"{KEY}\u00e9"])
def test_a_key_no_header_can_carry_is_refused_when_the_client_is_built(key: str) -> None:
    for kind in (Client, AsyncClient):
        with pytest.raises(InvalidArgument) as refused:
            kind("http://127.0.0.1:9", api_key=key)
        assert "TOPSECRET" not in str(refused.value) and "TOPSECRET" not in refused.value.message
        assert refused.value.code == "invalid_request"


@pytest.mark.parametrize("args", [("stats",), ("weight", "acme", "2"), ("submit", "s1", "hi"),
                                  ("tail", "s1", "--reconnect-timeout", "3"),
                                  ("submit", "s1", "hi", "--follow", "--reconnect-timeout", "3")])
def test_the_cli_with_such_a_key_is_a_usage_error_that_does_not_print_it(args: tuple[str, ...]) -> None:
    """Was exit 1 `no answer no_answer: ...: sent, but no answer came (LocalProtocolError: Illegal header value
    b'Bearer sk-live-...')`; `tail` printed that on each reconnect line for its whole --reconnect-timeout."""
    with scripted(JSON_OK) as server:
        started = time.monotonic()
        result = sg(*args, "--url", server.url, env={"SLUICEGATE_API_KEY": KEY + "\r"})
        assert "TOPSECRET" not in result.stderr + result.stdout, result.stderr
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "API key" in result.stderr and time.monotonic() - started < 2.5
        assert server.seen == []


def test_a_request_that_cannot_be_written_is_not_sent_and_not_retried() -> None:
    """A header value h11 refuses (here one added to the client's headers): nothing goes out, so `not_sent`,
    not `no_answer` ("a submit may have taken effect"); a stream raises it at once instead of retrying it for
    its whole reconnect_timeout (each retry fails the same way)."""
    with scripted(DONE_R1) as server, Client(server.url) as client:
        client.http.headers["X-Trace"] = "a\nb"
        with pytest.raises(SluicegateError) as refused:
            client.stats()
        assert (refused.value.status, refused.value.code) == (None, "not_sent")
        assert "may have taken effect" not in refused.value.message
        started = time.monotonic()
        with pytest.raises(SluicegateError) as refused:
            list(client.stream(request_id="r1", reconnect_timeout=3))
        assert (refused.value.status, refused.value.code) == (None, "not_sent")
        assert time.monotonic() - started < 1 and server.seen == []

    async def main() -> None:
        async with AsyncClient(server.url) as client:
            client.http.headers["X-Trace"] = "a\nb"
            started = time.monotonic()
            with pytest.raises(SluicegateError) as refused:
                async for _ in client.stream(request_id="r1", reconnect_timeout=3):
                    pass
            assert refused.value.code == "not_sent" and time.monotonic() - started < 1

    with scripted(DONE_R1) as server:
        asyncio.run(main())


def test_a_chat_header_that_cannot_be_written_is_not_sent() -> None:
    with scripted(JSON_OK) as server, Client(server.url) as client:
        with pytest.raises(SluicegateError) as refused:
            client.chat([{"role": "user", "content": "hi"}], tenant="acme\r\nX-Evil: 1")
        assert refused.value.code == "not_sent" and server.seen == []


def test_a_urls_password_is_in_no_message() -> None:
    """`http://bob:hunter2@host` (Basic auth through a proxy) printed hunter2 in every error."""
    port = free_port()  # nothing listens: `unreachable`, whose message names the URL
    with Client(f"http://bob:hunter2@127.0.0.1:{port}") as client, pytest.raises(SluicegateError) as refused:
        client.stats()
    assert refused.value.code == "unreachable" and f"127.0.0.1:{port}/v1/admin/stats" in refused.value.message
    assert "hunter2" not in str(refused.value)
    with Client(f"http://bob:hunter2@127.0.0.1:{port}") as client, pytest.raises(SluicegateError) as refused:
        list(client.stream(request_id="r1", reconnect_timeout=0.3))
    assert "hunter2" not in str(refused.value)
    with pytest.raises(InvalidArgument) as bad:
        Client("ftp://bob:hunter2@127.0.0.1:21")
    assert "hunter2" not in str(bad.value) and "ftp://127.0.0.1:21" in bad.value.message
    result = sg("submit", "s1", "hi", "--url", f"http://bob:hunter2@127.0.0.1:{port}")
    assert result.returncode == 1 and "hunter2" not in result.stderr and "127.0.0.1" in result.stderr


def test_a_urls_userinfo_is_still_sent_as_basic_auth() -> None:
    with scripted(JSON_OK) as server:
        url = server.url.replace("http://", "http://bob:hunter2@")
        with Client(url, api_key=KEY) as client, pytest.raises(SluicegateError):
            client.stats()  # {"ok": true} is not the stats: refused, but it was sent
        authorization = server.seen[0][2].get("Authorization", "")
        assert authorization == httpx.BasicAuth("bob", "hunter2")._auth_header  # as before: userinfo wins
