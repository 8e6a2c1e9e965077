"""A response's head goes out in one socket write with what follows it.

uvicorn writes a response's status line and headers as soon as the app sends them, and its body in
another write: a 202 answer to a submit is two `send` calls, two loopback segments and often two
wake-ups of the client, where one would do. On loopback a `send` also runs the receiver's side of
the stack: it is one of the costlier things a request does. Here the first write after a request's
bytes arrive (its answer's head) waits for the end of that turn of the loop, and whatever the app
writes meanwhile joins it: a head and a body sent together (every JSON answer; an event stream whose
first events are already there) go out as one. An answer's head alone at the end of its turn, its
body still to come (chat waiting for its first token), waits on for its body's first write or its
end, `HEAD_WAIT_SECONDS` at most, and goes out with it: the first token then reaches the client in
one write and one wake-up, and the client is not woken for a head while the worker calls its engine
(`bench ttft --against`: -0.04 to -0.08 ms paired in four runs). The bound is short, so that headers
are never more than 10 ms late: a request still queued, or an engine slower to its first token, gets
its head alone after it, as before. Bytes that arrive mid-answer (the rest of a body, a pipelined
request) hold none of that answer's writes. Once nothing is held, a write goes out at once, as before: a
stream's tokens pay no loop hop (held for a turn too, the first token came 0.06 ms later). Past
`FLUSH_BYTES` held, the writes go out at once, so that a response written in many pieces in one turn
still meets uvicorn's flow control (the transport's buffer limits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

FLUSH_BYTES = 64 * 1024  # held past this, the writes go out at once (uvloop's default high-water mark)
HEAD_WAIT_SECONDS = 0.01  # an answer's head alone waits this long at most for its body's first write


def no_answer() -> bool:
    """`answering` of a transport without one under way (a connection gone, or one not told)."""
    return False


class JoinedWrites:
    """A transport that holds its next write after `hold_next()` until the end of the turn, joined with
    whatever else is written in that turn, or, when it is an answer's head alone and `answering()` says
    that answer's body is still to come, until the next write or `head_wait`; other writes go out at once.

    Everything else is the wrapped transport's own. Closing writes what is held first; a transport
    already closing drops it (uvicorn writes nothing to a connection it knows is gone either)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 answering: Callable[[], bool] = no_answer, head_wait: float = HEAD_WAIT_SECONDS) -> None:
        self._transport = transport
        self._loop = loop
        self._answering = answering  # an answer's head is written, its body still to come
        self._head_wait = head_wait
        self._waiting: asyncio.TimerHandle | None = None
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
            self._loop.call_soon(self._turn_ended)
        self._held.append(data if type(data) is bytes else bytes(data))  # a caller may reuse its buffer
        self._size += len(data)
        if self._waiting is not None or self._size > FLUSH_BYTES:
            self.flush()

    def _turn_ended(self) -> None:
        """An answer's head alone waits for its body's first write (or `head_wait`); else flush."""
        if len(self._held) == 1 and self._waiting is None and self._answering():
            self._waiting = self._loop.call_later(self._head_wait, self.flush)
            return
        self.flush()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Write what is held now (the end of the turn, or of a head's wait, does it otherwise)."""
        self._stop_waiting()
        held = self._held
        if not held:
            return
        self._held, self._size = [], 0
        if self._transport.is_closing():
            return
        self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def _stop_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self.discard()
        self._transport.abort()

    def discard(self) -> None:
        """Drop what is held (the connection is gone)."""
        self._stop_waiting()
        self._held, self._size = [], 0

    def detach(self) -> None:
        """Forget the protocol's `answering` (the connection is gone): no cycle through it is left."""
        self._answering = no_answer

    def __getattr__(self, name: str) -> Any:  # is_closing, pause_reading, get_extra_info, ...
        return getattr(self._transport, name)


class JoinedWritesProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `JoinedWrites` transport (`sluicegate api` serves with it): the
    first write after a request's bytes arrive is held for the rest of the turn, and an answer's head
    alone for its body's first write or its end, `head_wait` at most."""

    head_wait = HEAD_WAIT_SECONDS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.joined = JoinedWrites(transport, self.loop, answering=self._answering, head_wait=self.head_wait)
        super().connection_made(self.joined)  # type: ignore[arg-type]

    def _answering(self) -> bool:
        """An answer is under way: its head is out and its body still to come."""
        cycle = self.cycle
        return cycle is not None and cycle.response_started and not cycle.response_complete

    def data_received(self, data: bytes) -> None:
        if not self._answering():  # bytes that arrive mid-answer (a body's rest, a pipelined request) hold none
            self.joined.hold_next()
        super().data_received(data)

    def on_response_complete(self) -> None:
        # An answer that ends without another write (a 204, an empty body, HEAD): its head waits no more.
        self.joined.flush()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.joined.discard()  # nothing more reaches the peer: no head's wait is left behind
        super().connection_lost(exc)
        # The joined transport's link back (`answering`, this protocol's method) made a cycle of every
        # connection: ~22 objects, ~5.7 KB, freed only by a full collection, which a flood of short
        # connections outpaced. Cut, a closed connection goes with its last reference.
        self.joined.detach()

    def eof_received(self) -> bool | None:
        # The client half-closed: the transport closes itself when this returns, past the wrapper, so
        # what is held (an answer written this turn) goes out first.
        self.joined.flush()
        return super().eof_received()
