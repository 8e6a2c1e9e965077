"""One socket write per connection and turn of the event loop, for the API's HTTP server.

uvicorn writes a response's status line and headers as soon as the app sends them, and its body in
another write: a 202 answer to a submit is two `send` calls, two loopback segments and often two
wake-ups of the client, where one would do. On loopback a `send` also runs the receiver's side of
the stack: it is one of the costlier things a request does. Here the protocol's transport gathers
what is written in one turn of the loop and writes it once at the end of that turn: a head and a body
sent together (every JSON answer; an event stream whose first events are already there) go out as
one; a head whose body comes later (a stream waiting for its first token) goes out a turn later, with
nothing held back for longer. Past `FLUSH_BYTES` held, a write goes out at once, so that a response
written in many pieces in one turn still meets uvicorn's flow control (the transport's buffer limits).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

FLUSH_BYTES = 64 * 1024  # held past this, the writes go out at once (uvloop's default high-water mark)


class JoinedWrites:
    """A transport whose writes in one turn of the loop go out in one write, at the end of the turn.

    Everything else is the wrapped transport's own. Closing writes what is held first; a transport
    already closing drops it (uvicorn writes nothing to a connection it knows is gone either)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(data)
        self._size += len(data)
        if self._size > FLUSH_BYTES:
            self._flush()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        held = self._held
        if not held:
            return
        self._held, self._size = [], 0
        if self._transport.is_closing():
            return
        self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._size = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, pause_reading, get_extra_info, ...
        return getattr(self._transport, name)


class JoinedWritesProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `JoinedWrites` transport (`sluicegate api` serves with it)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(JoinedWrites(transport, self.loop))  # type: ignore[arg-type]
