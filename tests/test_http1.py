"""The openai engine's lean HTTP/1.1 client (workers/engines/http1.py) against real loopback servers that
answer in each framing, keep or drop connections, and cut answers short."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trustme

from sluicegate.embedded import free_port
from sluicegate.workers.engines.http1 import (
    MAX_READ,
    BadResponse,
    CannotConnect,
    HTTP1Client,
    ResponseCut,
    ServerClosed,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """A raw HTTP server: `handler(reader, writer, n)` answers the n-th request (from 0) on a connection;
    it returns to serve the next one on the same connection. Counts connections and what it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.peer_closed = asyncio.Event()

    async def __aenter__(self) -> HTTP1Client:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.client = HTTP1Client(f"http://127.0.0.1:{port}/v1", {"x-test": "1"}, connect_timeout=5)
        return self.client

    async def __aexit__(self, *_: object) -> None:
        await self.client.aclose()
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                await self.handler(reader, writer, n)
                n += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            self.peer_closed.set()
        finally:
            writer.close()


async def body_of(client: HTTP1Client, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await client.post("/chat/completions", body)
    return response.status, await response.read()


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())


def test_each_framing_gives_the_body_and_kept_connections_are_reused() -> None:
    async def chunked(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n")
        await writer.drain()

    async def sized(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
        await writer.drain()

    async def main() -> None:
        async with Server(chunked) as client:
            assert [await body_of(client, b'{"n": %d}' % i) for i in range(3)] == [(200, b"hello world")] * 3
        server = Server(chunked)
        async with server as client:
            assert await body_of(client) == (200, b"hello world")
            assert await body_of(client) == (200, b"hello world")
        assert server.connections == 1  # kept, and reused
        request = server.requests[0]
        assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and request.endswith(b"\r\n\r\n{}")
        assert b"x-test: 1\r\n" in request and b"content-length: 2\r\n" in request
        sized_server = Server(sized)
        async with sized_server as client:
            assert await body_of(client) == (503, b"busy")  # the 1xx is skipped
            assert await body_of(client) == (503, b"busy")
        assert sized_server.connections == 1

    run(main)


def test_a_body_to_the_end_of_the_connection_and_connection_close_are_not_kept() -> None:
    async def to_eof(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()
        raise ConnectionError

    async def closing(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def main() -> None:
        for handler, body in ((to_eof, b"all of it"), (closing, b"ok")):
            server = Server(handler)
            async with server as client:
                assert await body_of(client) == (200, body)
                assert await body_of(client) == (200, body)
            assert server.connections == 2, handler

    run(main)


def test_a_request_on_a_connection_the_server_dropped_goes_out_again_on_a_new_one() -> None:
    """The server takes the second request on a kept connection and closes it without a byte of an answer
    (an idle keep-alive timeout meeting the request): the client sends it once more, on a new connection."""
    async def first_only(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n > 0:
            writer.transport.abort()
            raise ConnectionError
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def main() -> None:
        server = Server(first_only)
        async with server as client:
            assert [await body_of(client) for _ in range(3)] == [(200, b"ok")] * 3
        assert server.connections == 3 and len(server.requests) == 5  # two requests were sent twice

    run(main)


def test_an_answer_cut_short_is_an_error_and_a_refused_connection_says_so() -> None:
    async def cut(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\npart")
        await writer.drain()
        writer.transport.abort()
        raise ConnectionError

    async def main() -> None:
        async with Server(cut) as client:
            response = await client.post("/chat/completions", b"{}")
            assert await anext(response) == b"hello"
            with pytest.raises(ResponseCut, match="closed in the middle of the response"):
                async for _ in response:
                    pass
            response.release()
        refused = HTTP1Client(f"http://127.0.0.1:{free_port()}", {}, connect_timeout=5)
        with pytest.raises(CannotConnect, match=r"cannot connect \(Connection refused\)"):
            await refused.post("/", b"")
        head_only = Server(lambda _r, w, _n: _close(w))
        async with head_only as client:
            with pytest.raises(ServerClosed):  # a new connection: not sent again
                await client.post("/", b"")
        assert head_only.connections == 1

    run(main)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()
    raise ConnectionError


def test_a_body_left_unread_closes_its_connection_unless_its_end_was_seen() -> None:
    """release() on a stream still going closes the connection: the server sees it at once (that is what
    aborts a backend's generation). release(drain=True), after the stream's own end, reads the last
    bytes in the background and keeps the connection."""
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"6\r\ntoken \r\n")
            await writer.drain()
            await asyncio.sleep(0.005)

    async def late_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nDONE\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the terminating chunk comes after the caller has seen the end
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        server = Server(endless)
        async with server as client:
            response = await client.post("/", b"")
            assert await anext(response) == b"token "
            response.release()
            await asyncio.wait_for(server.peer_closed.wait(), 5)
        kept = Server(late_end)
        async with kept as client:
            for _ in range(2):
                response = await client.post("/", b"")
                assert await anext(response) == b"DONE"
                response.release(drain=True)
                await asyncio.sleep(0.2)
            assert kept.connections == 1 and not kept.peer_closed.is_set()

    run(main)


def test_an_https_origin_is_served_over_tls_and_an_untrusted_certificate_refused() -> None:
    """A backend behind TLS (a hosted OpenAI-compatible API): the body comes through the encrypted
    connection, which is kept; a certificate no trusted CA signed is `cannot connect (TLS: ...)`."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\nsecured\r\n0\r\n\r\n")
                await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_tls)
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        client = HTTP1Client(url, {}, connect_timeout=5, tls=trusting)
        try:
            assert await body_of(client) == (200, b"secured")
            assert await body_of(client) == (200, b"secured")
            assert connections == 1
            untrusting = HTTP1Client(url, {}, connect_timeout=5)  # the system's CAs only
            with pytest.raises(CannotConnect, match=r"cannot connect \(TLS: .*certificate"):
                await untrusting.post("/chat/completions", b"{}")
        finally:
            await client.aclose()
            server.close()

    run(main)


def test_an_error_body_is_read_only_up_to_its_limit() -> None:
    """A backend's error page read whole is cut at MAX_READ (a hostile or broken backend cannot grow the
    worker's memory with it); the rest goes with the connection, which is not kept."""
    size = 3 * MAX_READ

    async def huge(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 500 Oops\r\ncontent-length: %d\r\n\r\n" % size)
        with contextlib.suppress(ConnectionError):
            for _ in range(size // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()

    async def main() -> None:
        server = Server(huge)
        async with server as client:
            for _ in range(2):
                status, body = await body_of(client)
                assert status == 500 and body == b"x" * MAX_READ
            assert server.connections == 2

    run(main)


def test_a_chunk_size_that_is_not_hexadecimal_is_a_bad_response() -> None:
    """`-5`, `+5`, `1_0` or ` ` would pass int(..., 16) or leave the framing undefined: refused."""
    sizes = [b"-5", b"+5", b"1_0", b"zz", b" "]

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + sizes[n] + b"\r\nhello\r\n0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        server = Server(answer)
        async with server as client:
            for _ in sizes:
                response = await client.post("/", b"")
                with pytest.raises(BadResponse, match="not hexadecimal"):
                    await anext(response)
                response.release()
            assert server.connections == len(sizes)  # a broken framing's connection is never kept

    run(main)
