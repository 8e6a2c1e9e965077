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
from tests.helpers import Stack, fast_settings, run_sluicegate
from tests.scripted_server import DONE_R1, JSON_OK, scripted

sg = run_sluicegate
KEY = "sk-live-TOPSECRET-4242"


@pytest.mark.parametrize("key", [KEY + "\n", KEY + "\r\n", "\t" + KEY, KEY + " ", f"{KEY}\u00e9", " " + KEY,
                                 KEY + "\t", f"sk-live {KEY}\n", KEY.replace("-", "\n", 1), KEY.replace("-", "\0", 1),
                                 KEY.replace("-", "\x0c", 1)])
def test_a_key_no_header_can_carry_is_refused_when_the_client_is_built(key: str) -> None:
    for kind in (Client, AsyncClient):
        with pytest.raises(InvalidArgument) as refused:
            kind("http://127.0.0.1:9", api_key=key)
        assert "TOPSECRET" not in str(refused.value) and "TOPSECRET" not in refused.value.message
        assert refused.value.code == "invalid_request"


PASSPHRASE = "correct horse battery staple"  # an admin key: the server takes everything after `Bearer `


@pytest.mark.parametrize("key", [PASSPHRASE, "sk live\tTOPSECRET"])
def test_a_key_with_a_space_or_tab_inside_is_sent_as_it_is(key: str) -> None:
    """A space or tab inside a header value is one h11 writes (only a line end, a NUL, a non-ASCII character or
    whitespace at either end is not); the client refused it as it refused a line end (InvalidArgument "a
    character a header cannot carry at position 7"), though it worked before that refusal came in."""
    with scripted(JSON_OK) as server:
        with Client(server.url, api_key=key) as client, pytest.raises(SluicegateError) as refused:
            client.stats()  # {"ok": true} is not the stats: refused, but it was sent
        assert refused.value.code == "not_the_api"

        async def main() -> None:
            async with AsyncClient(server.url, api_key=key) as client:
                with pytest.raises(SluicegateError):
                    await client.stats()

        asyncio.run(main())
    assert [seen[2].get("Authorization") for seen in server.seen] == [f"Bearer {key}"] * 2


def test_a_passphrase_admin_key_is_the_servers(redis_url: str) -> None:
    """`--admin-key` has no character rule and the server's auth takes everything after the first space."""
    stack = Stack(fast_settings(redis_url, auth=True, admin_key=PASSPHRASE)).start(workers=0)
    try:
        with Client(stack.base_url, api_key=PASSPHRASE) as client:
            assert "queued" in client.stats()
        result = sg("stats", "--json", "--url", stack.base_url, env={"SLUICEGATE_API_KEY": PASSPHRASE})
        assert result.returncode == 0 and '"queued"' in result.stdout, result.stderr
    finally:
        stack.stop()


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


@pytest.mark.parametrize("url", ["http://alice:hunter2/Zq@127.0.0.1:{port}", "http://alice:s3cr3t?Zq@127.0.0.1:{port}",
                                 "http://alice:s3cr3t#Zq@127.0.0.1:{port}", "http://localhost:{other}/Zq@127.0.0.1:{port}",
                                 "alice:hunter2/Zq@127.0.0.1:{port}"])
def test_a_password_with_a_slash_question_mark_or_hash_is_refused_unnamed(url: str) -> None:
    """httpx ends the authority at an unencoded `/`, `?` or `#`, so `alice:hunter2` was the host and its port:
    httpx.InvalidURL "Invalid port: 'hunter2'" escaped as it was; a numeric one (`localhost:4711/Zq`) parsed,
    and every message named the whole URL as it tried to reach the user name's host."""
    url = url.format(port=free_port(), other=free_port())
    for kind in (Client, AsyncClient):
        with pytest.raises(InvalidArgument) as refused:
            kind(url)
        text = f"{refused.value} {refused.value.message}"
        assert "Zq" not in text and "hunter2" not in text and "s3cr3t" not in text, text
        assert "percent-encoded" in text and "127.0.0.1" in text, text
        assert unchained(refused.value)
    result = sg("stats", "--url", url)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "Zq" not in result.stderr and "hunter2" not in result.stderr and "percent-encoded" in result.stderr


def test_a_url_httpx_cannot_parse_is_named_by_its_scheme_and_host_only() -> None:
    """`Invalid port: 'hunter2'` was httpx's message, passed on as it was."""
    for url in ("http://alice:hunter2@127.0.0.1:99x", "http://alice:hunter2@[::1"):
        with pytest.raises(InvalidArgument) as refused:
            Client(url)
        assert "hunter2" not in str(refused.value) and "does not parse" in refused.value.message
        assert unchained(refused.value)


def unchained(error: BaseException) -> bool:
    """No httpx error chained to `error`, whose text a traceback would print."""
    return error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_the_cli_prints_no_text_of_an_invalid_url(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An httpx.InvalidURL that got past the client's checks quotes what it refused: the CLI printed it."""
    from sluicegate import client_cli
    from sluicegate.cli import build_parser

    def invalid(self: Client) -> None:
        raise httpx.InvalidURL("Invalid port: 'hunter2'")

    monkeypatch.setattr(Client, "stats", invalid)
    assert client_cli.run(build_parser().parse_args(["stats", "--url", f"http://127.0.0.1:{free_port()}"])) == 2
    stderr = capsys.readouterr().err
    assert "hunter2" not in stderr and "cannot send this" in stderr and len(stderr.splitlines()) == 1, stderr
