"""A lean pipelined Redis client for the calls on the way to a first token.

Measured on the 2-core host, an FCALL through redis-py's asyncio client took 240-293 us from call
to reply (p50, the client idle before it, as a request's calls are), through this client 132-151
us: redis-py's pool peeks at the socket with a zero timeout on every checkout (a loop iteration and
a cancelled timer per call), and each call crosses several coroutine layers. Three calls lie on
every first token's way (the API's submit, the worker's wake-up from its inbox, its first append),
so the scripts and the inbox go through this client; everything else stays with redis-py.

One connection per client, used from one event loop; a command on an idle connection is written at
once, and those made while one is in flight are written together when the turn's callbacks have run
(`_Replies`); replies are matched to callers in order, parsed by hiredis in the protocol's callback.
Error replies raise redis-py's exception classes (LOADING and NOAUTH are connection errors there,
which callers retry). A lost connection
fails the commands in flight with redis-py's ConnectionError (the callers already handle it) and the
next call reconnects, with one retry on a fresh connection as redis-py's pools do (the scripts
recognise a replayed call). A command left unanswered past `reply_timeout` aborts the connection: a
half-open connection fails instead of hanging forever.

A blocking command (a worker's BLMPOP on its inbox) holds every reply behind it, so it gets a client
of its own, made with `blocking=True`: no retry (an item popped with a lost reply is gone; the
caller must know), and a call given up (cancelled) closes the connection, so the server does not pop
for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
from redis.exceptions import AuthenticationError, BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError


class NotConnected(RedisConnectionError):
    """No connection could be made (refused, timed out, the login refused or cut): the command never went
    out, so it cannot have run (sessions/connect.py never_sent)."""


# Error codes with an exception class of their own in redis-py (the rest are ResponseError).
ERROR_CLASSES: dict[str, type[ResponseError] | type[RedisConnectionError]] = {
    "LOADING": BusyLoadingError, "NOAUTH": AuthenticationError, "WRONGPASS": AuthenticationError,
    "READONLY": ReadOnlyError, "OOM": OutOfMemoryError,
}


def reply_error(message: str) -> Exception:
    """The exception for an error reply, as redis-py raises it."""
    code, _, rest = message.partition(" ")
    kind = ERROR_CLASSES.get(code)
    return kind(rest) if kind is not None else ResponseError(message)


@dataclass(frozen=True)
class RedisAddress:
    """Where a redis://, rediss:// or unix:// URL points, and how to log in. A unix:// URL is
    redis-py's form: unix://[[user]:password@]/path/to/socket[?db=N]."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    path: str | None = None  # a Unix socket's: the server is on this host

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r} (redis://, rediss:// or unix://)")
        username = unquote(parsed.username) if parsed.username else None
        password = unquote(parsed.password) if parsed.password else None
        if parsed.scheme == "unix":
            query = parse_qs(parsed.query)
            if not parsed.path:
                raise ValueError("a unix:// Redis URL names the socket's path: unix:///path/to/socket")
            return cls(host="", port=0, db=int(query.get("db", ["0"])[0]), username=username,
                       password=password or query.get("password", [None])[0], path=unquote(parsed.path))
        path = parsed.path.strip("/")
        return cls(host=parsed.hostname or "127.0.0.1", port=parsed.port or 6379, db=int(path) if path else 0,
                   username=username, password=password, tls=parsed.scheme == "rediss")

    @property
    def where(self) -> str:
        """The address as an error message names it."""
        return self.path or f"{self.host}:{self.port}"

    def login(self, client_name: str | None = None, *, select_db: bool = True) -> list[tuple[Any, ...]]:
        """The commands that open a session on a fresh connection."""
        commands: list[tuple[Any, ...]] = []
        if self.password is not None:
            commands.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if select_db and self.db:
            commands.append(("SELECT", self.db))
        if client_name:
            commands.append(("CLIENT", "SETNAME", client_name))
        return commands


def encode(args: Iterable[Any]) -> bytes:
    return hiredis.pack_command(tuple(args))


class _Replies(asyncio.Protocol):
    """One connection: replies parsed as they arrive and handed to the oldest waiting command.

    A command sent while the connection has none in flight is written at once: it is the first token's
    case (the API's submit, a worker's first append), where a loop hop cost 23-28 us on the 2-core host
    (p50, from the call to the write; `bench ttft`'s idle host). Commands sent while others are in flight
    go out together in one write when the turn's ready callbacks have run (call_soon): under load, the
    runs of a worker or the streams of an API process that each send a command in the same turn cost one
    syscall, and Valkey one read, instead of one each (the rule Nagle's algorithm follows for TCP)."""

    def __init__(self, reply_timeout: float) -> None:
        self.transport: Any = None  # an asyncio.Transport (uvloop's does not subclass it)
        self.parser = hiredis.Reader(replyError=reply_error)
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outgoing: list[bytes] = []  # commands sent this turn, not yet written (see the class doc)
        self.lost = False
        self.reply_timeout = reply_timeout
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def send(self, data: bytes, count: int = 1) -> list[asyncio.Future[Any]]:
        """Write `count` commands (already encoded, back to back); one future per reply."""
        if self.lost or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("the connection to Redis is closed")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        idle = not self.waiting and not self.outgoing  # nothing in flight: written at once (the class doc)
        futures = [loop.create_future() for _ in range(count)]
        self.waiting.extend((future, now) for future in futures)
        if not self.outgoing and not idle:
            loop.call_soon(self._write_outgoing)
        self.outgoing.append(data)
        if idle:
            self._write_outgoing()
        if self._watchdog is None and not self.lost:
            self._watchdog = loop.call_later(self.reply_timeout, self._check_overdue)
        return futures

    def _write_outgoing(self) -> None:
        data, self.outgoing = self.outgoing, []
        if self.lost:  # their futures failed with the connection
            return
        if self.transport.is_closing():  # closed, connection_lost not yet called: fail them now
            self._fail(RedisConnectionError("the connection to Redis is closed"))
            return
        try:
            self.transport.write(data[0] if len(data) == 1 else b"".join(data))
        except Exception as error:  # raised here, in a callback, it would reach no caller
            self._fail(RedisConnectionError(f"writing to Redis failed: {error}"))

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        while (reply := self.parser.gets()) is not False:
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                self._fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            future, _ = self.waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _check_overdue(self) -> None:
        self._watchdog = None
        if not self.waiting:
            return
        age = time.monotonic() - self.waiting[0][1]
        if age >= self.reply_timeout:
            self._fail(RedisConnectionError(f"no reply from Redis in {self.reply_timeout:g} s"))
        else:
            self._watchdog = asyncio.get_running_loop().call_later(self.reply_timeout - age, self._check_overdue)

    def _fail(self, error: Exception) -> None:
        self.lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost ({exc or 'closed by the server'})"))


class LeanRedis:
    """`await client.execute("FCALL", ...)`: one pipelined connection, (re)connected on demand."""

    def __init__(self, url: str, *, client_name: str | None = None, connect_timeout: float = 5.0,
                 reply_timeout: float = 15.0, blocking: bool = False) -> None:
        self.address = RedisAddress.from_url(url)
        self.client_name = client_name
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.blocking = blocking
        self._conn: _Replies | None = None
        self._connecting = asyncio.Lock()
        self._closed = False

    async def _connection(self) -> _Replies:
        if self._closed:
            raise RedisConnectionError("the client is closed")
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn
        async with self._connecting:
            if self._conn is not None and not self._conn.lost:
                return self._conn
            self._conn = await self._connect()
            return self._conn

    async def _connect(self) -> _Replies:
        address = self.address
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if address.tls else None
        try:
            if address.path:
                opening = loop.create_unix_connection(lambda: _Replies(self.reply_timeout), address.path)
            else:
                opening = loop.create_connection(lambda: _Replies(self.reply_timeout), address.host, address.port,
                                                 ssl=context)
            _, conn = await asyncio.wait_for(opening, self.connect_timeout)
        except (OSError, TimeoutError) as error:
            raise NotConnected(f"cannot connect to Redis at {address.where}: {error}") from error
        login = address.login(self.client_name)
        try:
            if login:
                for reply in conn.send(b"".join(encode(c) for c in login), len(login)):
                    await reply
        except (ResponseError, AuthenticationError) as error:
            conn._fail(RedisConnectionError(f"Redis refused the login: {error}"))
            raise NotConnected(f"Redis refused the login: {error}") from error
        except RedisConnectionError as error:  # lost half-way: no command of a caller's went out
            conn._fail(RedisConnectionError("the login did not complete"))
            raise NotConnected(f"the login did not complete: {error}") from error
        except BaseException:  # cancelled half-way: the connection is not kept, so close it
            conn._fail(RedisConnectionError("the login did not complete"))
            raise
        return conn

    async def ready(self) -> None:
        """Connected (and logged in) now: the next `execute` in this loop turn writes at once, with no wait."""
        await self._connection()

    async def execute(self, *args: Any) -> Any:
        data = encode(args)
        if self.blocking:
            conn = await self._connection()
            try:
                return await conn.send(data)[0]
            except asyncio.CancelledError:
                conn._fail(RedisConnectionError("a blocking call was given up"))
                raise
        try:
            return await (await self._connection()).send(data)[0]
        except RedisConnectionError as first:  # a connection that died unnoticed: once more on a fresh one
            try:
                return await (await self._connection()).send(data)[0]
            except NotConnected:
                if isinstance(first, NotConnected):
                    raise
                raise first from None  # the first went out (its answer was lost): not "never sent"

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn._fail(RedisConnectionError("the client is closed"))
            self._conn = None
