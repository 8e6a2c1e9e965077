"""A response's head and what follows it in the same turn of the event loop go out in one socket write.

uvicorn writes a response's status line and headers as soon as the app sends them, and its body in
another write: a 202 answer to a submit is two `send` calls, two loopback segments and often two
wake-ups of the client, where one would do. On loopback a `send` also runs the receiver's side of
the stack: it is one of the costlier things a request does. Here the first write after a request's
bytes arrive (its answer's head) waits for the end of that turn of the loop, and whatever the app
writes meanwhile joins it: a head and a body sent together (every JSON answer; an event stream whose
first events are already there) go out as one; a head whose body comes later (a stream waiting for
its first token) goes out alone a turn later. Once nothing is held, a write goes out at once, as
before: a stream's tokens pay no loop hop (held for a turn too, the first token came 0.06 ms later,
`bench ttft --against`). Past `FLUSH_BYTES` held, the writes go out at once, so that a response
written in many pieces in one turn still meets uvicorn's flow control (the transport's buffer limits).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

FLUSH_BYTES = 64 * 1024  # held past this, the writes go out at once (uvloop's default high-water mark)


class JoinedWrites:
    """A transport that holds its next write after `hold_next()` until the end of the turn, joined with
    whatever else is written in that turn; other writes go out at once.

    Everything else is the wrapped transport's own. Closing writes what is held first; a transport
    already closing drops it (uvicorn writes nothing to a connection it knows is gone either)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._hold_next = True  # a new connection's first write is its first answer's head
        self._held: list[bytes] = []
        self._size = 0

    def hold_next(self) -> None:
        """The next write (a new request's answer begins with its head) waits for the end of the turn."""
        self._hold_next = True

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not (self._held or self._hold_next):
            self._transport.write(data)
            return
        self._hold_next = False
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data if type(data) is bytes else bytes(data))  # a caller may reuse its buffer
        self._size += len(data)
        if self._size > FLUSH_BYTES:
            self.flush()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Write what is held now (the end of the turn does it otherwise)."""
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
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._size = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, pause_reading, get_extra_info, ...
        return getattr(self._transport, name)


class JoinedWritesProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `JoinedWrites` transport (`sluicegate api` serves with it): the
    first write after a request's bytes arrive is held for the rest of the turn."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.joined = JoinedWrites(transport, self.loop)
        super().connection_made(self.joined)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.joined.hold_next()
        super().data_received(data)

    def eof_received(self) -> bool | None:
        # The client half-closed: the transport closes itself when this returns, past the wrapper, so
        # what is held (an answer written this turn) goes out first.
        self.joined.flush()
        return super().eof_received()
