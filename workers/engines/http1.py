"""A lean HTTP/1.1 client for the openai engine's streamed calls: the one backend call on a first token's way.

aiohttp's request and response machinery (cookie jar, multidicts, its connector, its payload parser
feeding a StreamReader) cost 0.4 ms of a first token on this path, measured against the same keep-alive
POST over raw asyncio streams (0.90 against 0.45 ms p50 to the first chunk, 1,000 tokens/s sim-backend).
This client does only what that call needs: a pool of kept connections to one origin, a POST written
in one write, a status line and headers parsed once, and a body read as it arrives (chunked,
content-length or to the end of the connection). The rest of the engine's HTTP (listing models,
the probe, token counts) stays on aiohttp: it is off the first token's way.

A body read to its end puts its connection back in the pool; a body left unread closes it (that is
what aborts a backend's generation when a run is cancelled), unless the caller saw the stream's own
end (`release(drain=True)`): then its last bytes are read in the background and the connection is kept.
A request on a kept connection that the server closed meanwhile (an idle keep-alive timeout) is sent
once more on a new connection, when not one byte of an answer came back. When nothing listens for that new
one, the call fails as the closed connection (ServerClosed), not as a server never reached: the server
may have died of this very request, and its refusal afterwards is no news of a server that was down.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from base64 import b64encode
from collections import deque
from urllib.parse import unquote, urlsplit, urlunsplit

READ_SIZE = 65536
MAX_HEAD = 65536  # bytes of a response's status line and headers
KEEPALIVE = 30.0  # seconds a kept connection may idle before it is closed instead of reused
DRAIN_TIMEOUT = 2.0  # seconds for a finished stream's last bytes, read in the background
MAX_READ = 2**20  # bytes of a body read whole (an error's): past them the rest is dropped with the connection


class HTTPClientError(Exception):
    """A failure of the call itself; its text is fit for a tenant (no address). `unreachable`: the server was
    not reached at all (nothing listening), as a backend still loading its model is (the worker stops offering
    its slots until its probe answers). A connection closed or reset after the request was sent is not: the
    backend may have died of this very request (a poison prompt), which must use up its attempts, not wait
    and crash the backend again at each restart."""

    unreachable = False


class CannotConnect(HTTPClientError):
    def __init__(self, error: OSError | TimeoutError) -> None:
        if isinstance(error, TimeoutError):
            reason = "timed out"
        elif isinstance(error, ssl.SSLError):  # its errno is OpenSSL's, not the OS's
            reason = "TLS: " + (getattr(error, "verify_message", None) or error.reason or type(error).__name__)
        else:
            reason = os.strerror(error.errno) if error.errno else type(error).__name__
        super().__init__(f"cannot connect ({reason})")
        self.unreachable = not isinstance(error, ssl.SSLError)  # a certificate refused is a setting's fault


class ServerClosed(HTTPClientError):
    def __init__(self) -> None:
        super().__init__("the server closed the connection")


class ResponseCut(HTTPClientError):
    def __init__(self) -> None:
        super().__init__("the connection closed in the middle of the response")


class BadResponse(HTTPClientError):
    """The bytes are not HTTP/1.x."""


def split_userinfo(url: str) -> tuple[str, str | None]:
    """`url` without its `user:password@` part, and that part as the value of a Basic `Authorization` header
    (its user and password percent-decoded, RFC 7617), or None when it has none: what is logged of a URL, and
    what a call to it sends."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    credentials = b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return urlunsplit(parts._replace(netloc=host)), f"Basic {credentials}"


class _Connection:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    @property
    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing() and self.reader.exception() is None

    def close(self) -> None:
        self.writer.transport.abort()  # no FIN handshake to wait for: the backend sees the stream end at once


class Response:
    """A response whose body is read as it arrives: `async for data in response` yields the body's bytes
    (chunk framing removed) in the pieces they came in. An async iterator, not a generator: one closed
    half-way is never left to the garbage collector's finalizer."""

    def __init__(self, client: HTTP1Client, connection: _Connection, status: int, headers: dict[str, str],
                 keep: bool) -> None:
        self.status = status
        self.headers = headers
        self._client = client
        self._connection: _Connection | None = connection
        self._keep = keep
        encoding = headers.get("transfer-encoding", "").lower()
        self._chunked = "chunked" in encoding
        self._left = -1  # bytes of the current chunk (chunked) or of the body (content-length) still to read
        self._to_eof = False
        if not self._chunked:
            if status in (204, 304):
                self._left = 0
            elif "content-length" in headers:
                try:
                    self._left = int(headers["content-length"])
                except ValueError:
                    raise BadResponse("a content-length that is not a number") from None
            else:
                self._to_eof, self._keep = True, False
        self._done = self._left == 0 and not self._chunked

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        if self._done or self._connection is None:
            raise StopAsyncIteration
        reader = self._connection.reader
        try:
            if self._chunked:
                return await self._next_chunked(reader)
            data = await reader.read(READ_SIZE if self._to_eof else min(self._left, READ_SIZE))
        except (OSError, asyncio.IncompleteReadError) as error:
            raise ResponseCut() from error
        except asyncio.LimitOverrunError:
            raise BadResponse(f"a chunk size line over {MAX_HEAD} bytes") from None
        if not data:
            if self._to_eof:
                self._done = True
                raise StopAsyncIteration
            raise ResponseCut()
        if not self._to_eof:
            self._left -= len(data)
            self._done = self._left == 0
        return data

    async def _next_chunked(self, reader: asyncio.StreamReader) -> bytes:
        if self._left <= 0:
            if self._left == 0 and await reader.readexactly(2) != b"\r\n":  # the end of the chunk before
                raise BadResponse("a chunk without its CRLF")
            size_line = await reader.readuntil(b"\r\n")
            size = size_line.split(b";", 1)[0].strip()
            if not size or size.strip(b"0123456789abcdefABCDEF"):
                raise BadResponse("a chunk size that is not hexadecimal")
            self._left = int(size, 16)
            if self._left == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any, up to the blank line
                    pass
                self._done = True
                raise StopAsyncIteration
        data = await reader.read(min(self._left, READ_SIZE))
        if not data:
            raise ResponseCut()
        self._left -= len(data)
        return data

    async def read(self, limit: int = MAX_READ) -> bytes:
        """The body (an error's), at most `limit` bytes of it; the connection is kept when it was read to
        its end, closed when it was longer (a backend cannot make this buffer grow without bound)."""
        pieces: list[bytes] = []
        size = 0
        try:
            async for data in self:
                pieces.append(data)
                size += len(data)
                if size >= limit:
                    break
            return b"".join(pieces)[:limit]
        finally:
            self.release()

    def release(self, *, drain: bool = False) -> None:
        """Done with the response: the connection is kept when the body was read to its end, closed when
        not; `drain`: the stream's own end was seen, so its last bytes are read in the background."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._done and self._keep:
            self._client.keep(connection)
        elif drain and self._keep:
            self._client.drain(self, connection)
        else:
            connection.close()

    async def _read_rest(self, connection: _Connection) -> None:
        """The drain: the connection is kept only when the body's end came in time, closed otherwise (a
        failure, or the client closing meanwhile, which cancels this)."""
        self._connection = connection
        ended = False
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                async for _ in self:
                    pass
            ended = True
        except (HTTPClientError, TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._done = self._done and ended
            self.release()


class HTTP1Client:
    """Kept connections to one origin (`http://` or `https://` host and port) and POSTs on them. An https
    origin's certificate is checked against the system's CAs (SSL_CERT_FILE names others), unless
    `tls` is given."""

    def __init__(self, base_url: str, headers: dict[str, str], *, connect_timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (tls or ssl.create_default_context()) if parts.scheme == "https" else None
        self.path = parts.path.rstrip("/")
        authority = parts.netloc.rpartition("@")[2]
        self._head = "".join(f"{name}: {value}\r\n" for name, value in {"host": authority, **headers}.items())
        self.connect_timeout = connect_timeout
        self._idle: deque[_Connection] = deque()  # the most recently kept on the right, taken first
        self._draining: set[asyncio.Task[None]] = set()
        self._closed = False

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> Response:
        """POST `body` to base path + `path`; the response once its head is in (its body is not read)."""
        return await self.request("POST", path, body, headers)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> Response:
        """`method` on base path + `path` with `body` (the benchmark clients GET too); as `post`."""
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()) if headers else ""
        if body or method not in ("GET", "HEAD"):  # a GET without a body says nothing of one (RFC 9110 8.6)
            extra += f"content-length: {len(body)}\r\n"
        request = f"{method} {self.path}{path} HTTP/1.1\r\n{self._head}{extra}\r\n".encode("latin-1") + body
        connection = self._kept()
        if connection is not None:
            try:
                return await self._exchange(connection, request)
            except ServerClosed as closed:  # it closed while kept: once more on a new connection
                try:
                    connection = await self._connect()
                except CannotConnect:  # nothing listens any more: it may have died of this very request
                    raise closed from closed.__cause__  # not `unreachable`: the request reached it
                return await self._exchange(connection, request)
        return await self._exchange(await self._connect(), request)

    async def _exchange(self, connection: _Connection, request: bytes) -> Response:
        try:
            connection.writer.write(request)
            await connection.writer.drain()
            while True:
                head = await connection.reader.readuntil(b"\r\n\r\n")
                status, headers, keep = parse_head(head)
                if status >= 200:
                    return Response(self, connection, status, headers, keep)
        except asyncio.IncompleteReadError as error:
            connection.close()
            raise (ServerClosed() if not error.partial else ResponseCut()) from error
        except OSError as error:  # reset, or a TLS failure
            connection.close()
            raise ServerClosed() from error
        except asyncio.LimitOverrunError:
            connection.close()
            raise BadResponse(f"a response head over {MAX_HEAD} bytes") from None
        except BaseException:
            connection.close()
            raise

    def _kept(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable and now - connection.idle_since < KEEPALIVE:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self.ssl, limit=MAX_HEAD,
                    server_hostname=self.host if self.ssl else None)
        except (OSError, TimeoutError) as error:
            raise CannotConnect(error) from error
        return _Connection(reader, writer)

    def keep(self, connection: _Connection) -> None:
        if self._closed or not connection.usable:
            connection.close()
            return
        connection.idle_since = now = time.monotonic()
        self._idle.append(connection)
        while not (oldest := self._idle[0]).usable or now - oldest.idle_since >= KEEPALIVE:
            self._idle.popleft().close()  # closed by the server, or idle too long: not left half-open

    def drain(self, response: Response, connection: _Connection) -> None:
        task = asyncio.get_running_loop().create_task(response._read_rest(connection))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)
        while self._idle:
            self._idle.pop().close()


def parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """(status, headers with lower-case names, whether the connection may be kept) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise BadResponse(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    try:
        status = int(rest[:3])
    except ValueError:
        raise BadResponse(f"a status line without a status: {lines[0][:80]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return status, headers, keep
