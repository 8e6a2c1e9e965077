"""The floor of Sluicegate's first-token path: its hops, with almost nothing done at each.

`bench ttft --modes direct,floor,chat` times a first token through two minimal relays that cross the
same processes and sockets as Sluicegate's chat route, in the same order, but do next to no work:

    client -> front (the API's place) -> Valkey (LPUSH) -> back (the worker's place, BLMPOP)
           -> backend -> back (first content line) -> Valkey (PUBLISH) -> front (subscriber) -> client

No FastAPI, no scripts (one LPUSH, one PUBLISH), no bookkeeping, no durable log: a raw asyncio HTTP
server in front, a raw HTTP/1.1 client behind, the lean RESP client (sessions/resp.py) between. What
this chain adds over the direct call is what the hops alone cost on the host (process wake-ups, socket
round trips, the smallest Python on each side): no implementation of this design can add less there.
What Sluicegate adds above it is its own work, the part that code can still win.

Run as `python -m sluicegate.loadtest.floor_relay front|back REDIS_URL ...` (the bench starts both).
Sequential use only: one request at a time, as the ttft bench sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
from collections.abc import Iterator

import hiredis
import orjson
import uvloop

from sluicegate.loadtest.common import free_port, scratch_server
from sluicegate.sessions.resp import LeanRedis, RedisAddress, encode

QUEUE = "floor:q"
CHANNEL = "floor:first"


class Front(asyncio.Protocol):
    """One client connection: a POST's body goes to the queue; the first token, when it is published,
    goes back as a complete SSE answer (the token's chunk, then [DONE]; keep-alive)."""

    def __init__(self, relay: FrontRelay) -> None:
        self.relay = relay
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        length = 0
        for line in self.buffer[:head_end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        end = head_end + 4 + length
        if len(self.buffer) < end:
            return
        body, self.buffer = self.buffer[head_end + 4:end], self.buffer[end:]
        self.relay.submit(self, body)

    def answer(self, line: bytes) -> None:
        payload = line + b"\n\ndata: [DONE]\n\n"
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: "
                                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)


class FrontRelay:
    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.redis = LeanRedis(redis_url)
        self.waiting: dict[bytes, Front] = {}
        self.ids = itertools.count()

    def submit(self, front: Front, body: bytes) -> None:
        rid = str(next(self.ids)).encode()
        self.waiting[rid] = front
        asyncio.ensure_future(self.redis.execute("LPUSH", QUEUE, rid + b"|" + body))

    async def listen(self, ready: asyncio.Event) -> None:
        """SUBSCRIBE on a connection of its own; each message is `rid|first data line`."""
        address = RedisAddress.from_url(self.redis_url)
        reader, writer = await asyncio.open_connection(address.host, address.port)
        for command in (*address.login(), ("SUBSCRIBE", CHANNEL)):
            writer.write(encode(command))
        parser = hiredis.Reader()
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the subscriber connection closed")
            parser.feed(data)
            while (message := parser.gets()) is not False:
                if isinstance(message, list) and message[0] == b"subscribe":
                    ready.set()
                elif isinstance(message, list) and message[0] == b"message":
                    rid, _, line = message[2].partition(b"|")
                    front = self.waiting.pop(rid, None)
                    if front is not None:
                        front.answer(line)

    async def serve(self, port: int) -> None:
        ready = asyncio.Event()
        listener = asyncio.create_task(self.listen(ready))
        await ready.wait()
        server = await asyncio.get_running_loop().create_server(lambda: Front(self), "127.0.0.1", port)
        print("ready", flush=True)
        async with server:
            await listener


class BackRelay:
    """Pops a request, posts it to the backend on a kept connection, publishes the first content line,
    then reads the answer to its end (so the connection is reused)."""

    def __init__(self, redis_url: str, backend: str) -> None:
        self.inbox = LeanRedis(redis_url, blocking=True)
        self.redis = LeanRedis(redis_url)
        host, _, port = backend.removeprefix("http://").partition("/")[0].partition(":")
        self.host, self.port = host, int(port or 80)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        await self.redis.execute("PING")
        print("ready", flush=True)
        while True:
            reply = await self.inbox.execute("BLMPOP", 1, 1, QUEUE, "RIGHT")
            if reply is None:
                continue
            rid, _, body = reply[1][0].partition(b"|")
            await self.relay(rid, body)

    async def relay(self, rid: bytes, body: bytes) -> None:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: " + self.host.encode()
                          + b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
                          + b"\r\n\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if b"chunked" not in head.lower():
            raise RuntimeError(f"expected a chunked SSE answer, got {head[:200]!r}")
        sent, pending = False, b""
        while True:  # chunked transfer encoding: size line, data, CRLF; a 0 size ends it
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            pending += (await self.reader.readexactly(size + 2))[:-2]
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if sent or not line.startswith(b"data: {"):
                    continue
                choices = orjson.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    sent = True
                    asyncio.ensure_future(self.redis.execute("PUBLISH", CHANNEL, rid + b"|" + line))


@contextlib.contextmanager
def floor_chain(backend_url: str) -> Iterator[str]:
    """A Valkey of its own (AOF, appendfsync everysec, as `serve` runs it), the back relay in front of
    `backend_url` and the front relay; yields the front's base URL."""
    server = scratch_server(persistent=True)
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for args in (["back", server.url, backend_url], ["front", server.url, str(port)]):
            process = subprocess.Popen([sys.executable, "-m", "sluicegate.loadtest.floor_relay", *args],
                                       stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
            processes.append(process)
            assert process.stdout is not None
            if process.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the floor relay {args[0]} did not start (exit code {process.wait(5)})")
        yield f"http://127.0.0.1:{port}"
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
        server.stop()


def main(argv: list[str]) -> None:
    role, redis_url = argv[0], argv[1]
    if role == "front":
        uvloop.run(FrontRelay(redis_url).serve(int(argv[2])))
    elif role == "back":
        uvloop.run(BackRelay(redis_url, argv[2]).run())
    else:
        raise SystemExit("usage: floor_relay front REDIS_URL PORT | back REDIS_URL BACKEND_URL")


if __name__ == "__main__":
    main(sys.argv[1:])
