"""The API's HTTP protocol (api/joined_writes.py): the first write after a request's bytes arrive (its
answer's head) waits for the rest of the turn and goes out with whatever the app writes in it; an
answer's head alone waits on for its body's first write, `head_wait` at most, or its end; later
writes go out at once; closing never loses what is held. Checked on a recording transport (alone, and under
uvicorn's protocol), and on a real uvicorn server with a raw socket client."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from sluicegate.api.joined_writes import FLUSH_BYTES, HEAD_WAIT_SECONDS, JoinedWrites, JoinedWritesProtocol
from sluicegate.embedded import free_port


class Recorder(asyncio.Transport):
    """The socket side: what reached it, write by write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False
        self.closed = self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing or self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 7

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def turns(n: int) -> None:
    """Let `n` turns of the event loop go by (no time passes to speak of: a head's wait does not end)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(done: Callable[[], bool]) -> None:
    """Turn the loop until `done()`, 5 s at most."""
    async with asyncio.timeout(5):
        while not done():
            await asyncio.sleep(0)


def on_loop(test: Any, **options: Any) -> None:
    async def main() -> None:
        recorder = Recorder()
        await test(recorder, JoinedWrites(recorder, asyncio.get_running_loop(), **options))

    asyncio.run(main())


def test_the_head_waits_for_its_turn_to_end_joined_with_what_follows_it_and_later_writes_go_at_once() -> None:
    async def test(recorder: Recorder, joined: JoinedWrites) -> None:
        joined.write(b"HTTP/1.1 202 Accepted\r\n\r\n")  # a new connection's first write: a head
        joined.write(b"")
        joined.write(b'{"ok": 1}')
        assert recorder.writes == []  # held for the rest of the turn
        assert joined.get_write_buffer_size() == 7 + 25 + 9
        await asyncio.sleep(0)
        assert recorder.writes == [b'HTTP/1.1 202 Accepted\r\n\r\n{"ok": 1}']
        joined.write(b"data: 1\n\n")  # a stream's token: nothing held, so at once
        assert recorder.writes[1:] == [b"data: 1\n\n"]
        joined.hold_next()  # the next request came in
        joined.writelines([b"HTTP/1.1 200 OK\r\n\r\n", b"0\r\n\r\n"])
        assert recorder.writes[2:] == []
        await asyncio.sleep(0)
        assert recorder.writes[2:] == [b"HTTP/1.1 200 OK\r\n\r\n0\r\n\r\n"]
        assert joined.get_write_buffer_size() == 7

    on_loop(test)


def test_past_the_flush_size_what_is_held_goes_out_at_once() -> None:
    async def test(recorder: Recorder, joined: JoinedWrites) -> None:
        joined.write(b"h")
        joined.write(b"x" * FLUSH_BYTES)
        assert recorder.writes == [b"h" + b"x" * FLUSH_BYTES]  # the transport's flow control sees it now
        await asyncio.sleep(0)
        assert len(recorder.writes) == 1

    on_loop(test)


def test_close_writes_what_is_held_first_and_a_closing_transport_or_an_abort_drops_it() -> None:
    async def test(recorder: Recorder, joined: JoinedWrites) -> None:
        joined.write(b"last chunk")
        joined.close()
        assert recorder.writes == [b"last chunk"] and recorder.closed
        await asyncio.sleep(0)  # the turn's end finds nothing more to write (and no write after close)
        assert recorder.writes == [b"last chunk"]

    on_loop(test)

    async def gone(recorder: Recorder, joined: JoinedWrites) -> None:
        joined.write(b"to a peer that left")
        recorder.closing = True
        await asyncio.sleep(0)
        assert recorder.writes == []
        recorder.closing = False
        joined.hold_next()
        joined.write(b"held")
        joined.abort()
        await asyncio.sleep(0)
        assert recorder.writes == [] and recorder.aborted

    on_loop(gone)


def test_a_streamed_head_alone_waits_for_its_first_chunk_or_head_wait_then_goes_out() -> None:
    async def joined_with_its_first_chunk(recorder: Recorder, joined: JoinedWrites) -> None:
        joined.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(5):  # turns go by: the head waits for its body (turns, not ms: a paused host would
            await asyncio.sleep(0)  # run the head-wait timer before this task, 10 ms were 2 failures in 9)
        assert recorder.writes == []
        joined.write(b"7\r\ndata: 1\r\n")  # the first token: out at once, with the head
        assert recorder.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n"]
        joined.write(b"7\r\ndata: 2\r\n")
        assert recorder.writes[1:] == [b"7\r\ndata: 2\r\n"]
        await asyncio.sleep(0.05)  # the spent wait writes nothing more
        assert len(recorder.writes) == 2

    on_loop(joined_with_its_first_chunk, answering=lambda: True, head_wait=0.02)  # spent by the 0.05 s below

    async def alone_after_head_wait(recorder: Recorder, joined: JoinedWrites) -> None:
        joined.write(b"HTTP/1.1 200 OK\r\n\r\n")
        for _ in range(5):  # turns, not ms (see above)
            await asyncio.sleep(0)
        assert recorder.writes == []
        await asyncio.sleep(0.05)
        assert recorder.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
        joined.write(b"late")  # nothing held: at once
        assert recorder.writes[1:] == [b"late"]

    on_loop(alone_after_head_wait, answering=lambda: True, head_wait=0.02)

    async def with_its_first_chunk_in_the_same_turn(recorder: Recorder, joined: JoinedWrites) -> None:
        joined.write(b"HTTP/1.1 200 OK\r\n\r\n")  # a stream whose first events are already there
        joined.write(b"7\r\ndata: 1\r\n")
        await asyncio.sleep(0)  # the turn's end: out, not held for a further write
        assert recorder.writes == [b"HTTP/1.1 200 OK\r\n\r\n7\r\ndata: 1\r\n"]

    on_loop(with_its_first_chunk_in_the_same_turn, answering=lambda: True, head_wait=10)

    async def closed_or_aborted_while_waiting(recorder: Recorder, joined: JoinedWrites) -> None:
        joined.write(b"head")
        await asyncio.sleep(0)
        joined.close()  # what is held goes out first; the wait then writes nothing after the close
        assert recorder.writes == [b"head"] and recorder.closed
        recorder.closed = False
        joined.hold_next()
        joined.write(b"another head")
        await asyncio.sleep(0)
        joined.abort()
        await asyncio.sleep(0.05)
        assert recorder.writes == [b"head"] and recorder.aborted

    on_loop(closed_or_aborted_while_waiting, answering=lambda: True, head_wait=0.02)


def on_protocol(test: Any, head_wait: float = HEAD_WAIT_SECONDS) -> None:
    """`test(protocol, recorder, release)`: uvicorn's protocol, on a joined transport over a recorder, serving
    `answering(release)`; a head alone waits `head_wait` at most."""

    async def main() -> None:
        release = asyncio.Event()
        waiting = type("Protocol", (JoinedWritesProtocol,), {"head_wait": head_wait})
        config = uvicorn.Config(answering(release), http=waiting, lifespan="off", log_level="warning")
        protocol = waiting(config, ServerState(), {}, _loop=asyncio.get_running_loop())
        recorder = Recorder()
        protocol.connection_made(recorder)
        try:
            await test(protocol, recorder, release)
        finally:
            protocol.connection_lost(None)

    asyncio.run(main())


def test_a_held_answer_goes_out_before_a_half_closed_connection_closes_and_a_reused_buffer_is_copied() -> None:
    async def test(protocol: JoinedWritesProtocol, recorder: Recorder, release: asyncio.Event) -> None:
        buffer = bytearray(b"HTTP/1.1 202 Accepted\r\n\r\n")
        protocol.joined.write(buffer)  # held: the connection's first write
        buffer[:] = b"reused"
        protocol.eof_received()  # the client's FIN: the transport closes itself after this
        assert recorder.writes == [b"HTTP/1.1 202 Accepted\r\n\r\n"]

    on_protocol(test)


def test_under_uvicorns_protocol_each_answer_of_a_kept_connection_is_one_write() -> None:
    async def test(protocol: JoinedWritesProtocol, recorder: Recorder, release: asyncio.Event) -> None:
        for n in (1, 2):  # the second request on the kept connection: its head is held again
            protocol.data_received(b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n")
            await until(lambda count=n: len(recorder.writes) >= count)
            await asyncio.sleep(0.01)
            assert len(recorder.writes) == n
            assert recorder.writes[-1].startswith(b"HTTP/1.1 202 Accepted\r\n")
            assert recorder.writes[-1].endswith(b'\r\n\r\n{"ok": 1}')

    on_protocol(test)


def test_under_uvicorns_protocol_a_streamed_answer_goes_out_with_its_first_chunk() -> None:
    async def test(protocol: JoinedWritesProtocol, recorder: Recorder, release: asyncio.Event) -> None:
        protocol.data_received(b"GET /late HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.sleep(0.01)  # the app sent its head and waits: uvicorn wrote the head, held here
        assert recorder.writes == [] and protocol.cycle.response_started
        release.set()
        await until(lambda: bool(recorder.writes))
        (answer,) = recorder.writes
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"data: late\n\n\r\n0\r\n\r\n")

    on_protocol(test, head_wait=60)


def test_under_uvicorns_protocol_bytes_that_arrive_mid_answer_hold_none_of_its_writes() -> None:
    async def test(protocol: JoinedWritesProtocol, recorder: Recorder, release: asyncio.Event) -> None:
        # /stream answers with a head and a first chunk, then reads the rest of its body before a second
        protocol.data_received(b"POST /stream HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nab")
        await until(lambda: bool(recorder.writes))
        assert recorder.writes[0].endswith(b"data: 1\n\n\r\n")  # the head with the first chunk
        protocol.data_received(b"cd")  # the body's rest, mid-answer
        await turns(20)  # a few turns: the second chunk is written when sent, not after a head's wait
        assert recorder.writes[1:] == [b"9\r\ndata: 2\n\n\r\n"]
        release.set()
        await turns(20)
        assert recorder.writes[2:] == [b"0\r\n\r\n"]

    on_protocol(test)


def test_under_uvicorns_protocol_a_100_continue_goes_out_at_the_end_of_its_turn() -> None:
    async def test(protocol: JoinedWritesProtocol, recorder: Recorder, release: asyncio.Event) -> None:
        protocol.data_received(b"POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
        await turns(20)  # the app reads its body: uvicorn writes 100 Continue, not an answer's head
        assert recorder.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        protocol.data_received(b"hi")
        await until(lambda: len(recorder.writes) >= 2)
        assert recorder.writes[1].startswith(b"HTTP/1.1 200 OK\r\n") and recorder.writes[1].endswith(b"\r\n\r\nhi")

    on_protocol(test)


def test_under_uvicorns_protocol_an_answer_that_ends_without_a_body_write_waits_for_nothing() -> None:
    async def test(protocol: JoinedWritesProtocol, recorder: Recorder, release: asyncio.Event) -> None:
        protocol.data_received(b"GET /empty HTTP/1.1\r\nhost: x\r\n\r\n")  # a 204, its empty body a turn later
        await turns(20)
        assert len(recorder.writes) == 1 and recorder.writes[0].startswith(b"HTTP/1.1 204 No Content\r\n")
        protocol.data_received(b"HEAD /late HTTP/1.1\r\nhost: x\r\n\r\n")  # uvicorn writes no body for HEAD
        await turns(5)
        assert len(recorder.writes) == 1  # the head waits (for a body or the answer's end)
        release.set()
        await turns(20)
        assert len(recorder.writes) == 2 and recorder.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")
        assert recorder.writes[1].endswith(b"\r\n\r\n")

    on_protocol(test, head_wait=60)


def test_under_uvicorns_protocol_a_request_pipelined_while_a_head_waits_is_answered_after_it_in_order() -> None:
    async def test(protocol: JoinedWritesProtocol, recorder: Recorder, release: asyncio.Event) -> None:
        protocol.data_received(b"GET /late HTTP/1.1\r\nhost: x\r\n\r\n")
        await turns(5)
        protocol.data_received(b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n")  # pipelined: queued by uvicorn
        await turns(5)
        assert recorder.writes == []  # /late's head still waits for its body
        release.set()
        await until(lambda: b'{"ok": 1}' in b"".join(recorder.writes))
        stream = b"".join(recorder.writes)
        late, json = stream.split(b"0\r\n\r\n", 1)  # /late's end, then the answer to /json
        assert late.startswith(b"HTTP/1.1 200 OK\r\n") and late.endswith(b"data: late\n\n\r\n")
        assert recorder.writes[0] == late + b"0\r\n\r\n"  # its head went out with its body (and end)
        assert json.startswith(b"HTTP/1.1 202 Accepted\r\n") and json.endswith(b'\r\n\r\n{"ok": 1}')

    on_protocol(test, head_wait=60)


def test_under_uvicorns_protocol_a_connection_lost_while_a_head_waits_leaves_nothing_to_write() -> None:
    async def test(protocol: JoinedWritesProtocol, recorder: Recorder, release: asyncio.Event) -> None:
        protocol.data_received(b"GET /late HTTP/1.1\r\nhost: x\r\n\r\n")
        await turns(5)
        protocol.connection_lost(ConnectionResetError())
        await asyncio.sleep(0.1)  # past the head's wait: nothing is written to the connection that is gone
        assert recorder.writes == [] and protocol.joined.get_write_buffer_size() == 7

    on_protocol(test, head_wait=0.02)


def answering(release: asyncio.Event) -> Any:
    """/json: a head and a body sent together; /late: a head, then its body once `release` is set;
    /stream: a head and a first chunk, a second once its request's body is read, its end on `release`;
    /echo: its request's body; /empty: a 204 whose (empty) body is sent a turn after its head."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/empty":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] == "/echo":
            body = (await receive())["body"]
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["path"] == "/json":
            await send({"type": "http.response.start", "status": 202,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"9")]})
            await send({"type": "http.response.body", "body": b'{"ok": 1}'})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        if scope["path"] == "/stream":
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})
            await release.wait()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await release.wait()
        await send({"type": "http.response.body", "body": b"data: late\n\n", "more_body": False})

    return app


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[int, asyncio.Event, uvicorn.Server]]:
    release = asyncio.Event()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(answering(release), host="127.0.0.1", port=port, log_level="warning",
                                           http=JoinedWritesProtocol, lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port, release, server
    finally:
        server.should_exit = True
        await task


async def read_until(sock: socket.socket, done: Callable[[bytes], bool], timeout: float = 5) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while not done(data):
            data += await loop.sock_recv(sock, 65536)
    return data


def test_a_served_connection_answers_in_order_on_the_joined_transport_and_a_late_bodys_head_waits_boundedly() -> None:
    async def main() -> None:
        async with serving() as (port, release, server):
            loop = asyncio.get_running_loop()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setblocking(False)
                # two requests pipelined on one connection: both answers, whole and in order
                await loop.sock_sendall(sock, b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n" * 2)
                data = await read_until(sock, lambda d: d.count(b'{"ok": 1}') == 2)
                assert data.count(b"HTTP/1.1 202 Accepted\r\n") == 2 and data.endswith(b'{"ok": 1}')
                (protocol,) = server.server_state.connections
                assert isinstance(protocol.transport, JoinedWrites)  # type: ignore[attr-defined]
                # the head of a streamed answer whose body waits goes out alone after HEAD_WAIT_SECONDS
                sent = loop.time()
                await loop.sock_sendall(sock, b"GET /late HTTP/1.1\r\nhost: x\r\n\r\n")
                head = await read_until(sock, lambda d: b"\r\n\r\n" in d)
                assert loop.time() - sent >= HEAD_WAIT_SECONDS * 0.9  # the loop's timer may fire a hair early
                assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"data: late" not in head
                release.set()
                body = await read_until(sock, lambda d: d.endswith(b"0\r\n\r\n"))
                assert b"data: late\n\n" in body

    asyncio.run(main())


def test_a_closed_connection_is_freed_at_once_not_left_to_the_cyclic_collector() -> None:
    """The joined transport asks its protocol whether an answer is under way; once the connection is lost
    that link is cut, so a closed connection's protocol, transport and request cycle (about 5.7 KB of
    Python objects with uvloop) go when the last reference does. Left to the cyclic collector, they piled
    up between its rare full collections under a flood of short connections."""

    async def main() -> None:
        async with serving() as (port, _release, server):
            loop = asyncio.get_running_loop()
            protocols = []
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.setblocking(False)
                    await loop.sock_sendall(sock, b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n")
                    await read_until(sock, lambda d: d.endswith(b'{"ok": 1}'))
                    (protocol,) = server.server_state.connections
                    protocols.append(weakref.ref(protocol))
                    del protocol
                await until(lambda: not server.server_state.connections)
            await turns(5)
            assert [ref() for ref in protocols] == [None] * 5

    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()
