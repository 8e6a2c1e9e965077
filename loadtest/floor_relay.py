"""The floor of Sluicegate's first-token path: its hops, with almost nothing done at each.

`bench ttft --modes direct,floor,chat` times a first token through two minimal relays that cross the
same processes and sockets as Sluicegate's chat route, in the same order, but do next to no work:

    client -> front (the API's place) -> Valkey (LPUSH) -> back (the worker's place, BLMPOP)
           -> backend -> back (first content line) -> Valkey (PUBLISH) -> front (subscriber) -> client

No FastAPI, no scripts (one LPUSH, one PUBLISH per message), no bookkeeping, no durable log: a raw
asyncio HTTP server in front, the worker's lean HTTP/1.1 client (workers/engines/http1.py) behind, the
lean RESP client (sessions/resp.py) between. The answer ends when the backend's has, as through
Sluicegate, so a timed request never overlaps the tail of the one before. What
this chain adds over the direct call is what the hops alone cost on the host (process wake-ups, socket
round trips, the smallest Python on each side): no implementation of this design can add less there.
What Sluicegate adds above it is its own work, the part that code can still win.

`bench ttft --modes floor-one` times the floor of another shape, with no worker process: one relay in the
API's place stores the request (one SET), calls the backend once Valkey has acknowledged it, stores the
first token (one SET) and sends it to the client on that reply, so a token is still kept before it is seen:

    client -> one (SET) -> Valkey -> one -> backend -> one (first content line, SET) -> Valkey -> one -> client

It crosses as many sockets as the chain above, but between two processes instead of three, and Valkey
answers the process that asked instead of waking another one (no BLMPOP, no PUBLISH).

Run as `python -m sluicegate.loadtest.floor_relay front|back|one REDIS_URL ...` (the bench starts them).
Sequential use only: one request at a time, as the ttft bench sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator

import hiredis
import orjson
import uvloop

from sluicegate.loadtest.common import free_port, scratch_server
from sluicegate.sessions.resp import LeanRedis, RedisAddress, encode
from sluicegate.workers.engines.http1 import HTTP1Client, HTTPClientError

QUEUE = "floor:q"
CHANNEL = "floor:first"
FIRST, END, FAILED = b"first", b"end", b"failed"  # what a message on CHANNEL says of its request
KEPT_SECONDS = 60  # how long the one-process relay keeps a request and its first token


class Front(asyncio.Protocol):
    """One client connection: a POST's body goes to the relay; the first token goes back as soon as the
    relay has it, and the answer ends ([DONE], kept connection) when the backend's has ended; a failure
    before the first token is a 502."""

    def __init__(self, relay: FrontRelay | OneProcessRelay) -> None:
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

    def first(self, line: bytes) -> None:
        """The answer's head and its first token; the rest of the backend's answer is not relayed."""
        self.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                   + chunk(line + b"\n\n"))

    def end(self) -> None:
        """The backend's answer has ended: so does this one (the client reads it to its end, so the next
        request starts only once the backend is done, as through Sluicegate)."""
        self.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def fail(self, reason: bytes, started: bool) -> None:
        if started:  # nothing truthful can follow a started answer
            if self.transport is not None:
                self.transport.abort()
            return
        self.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: "
                   + str(len(reason)).encode() + b"\r\n\r\n" + reason)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class FrontRelay:
    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.redis = LeanRedis(redis_url)
        self.waiting: dict[bytes, tuple[Front, bool]] = {}  # request id -> its client, whether it has begun
        self.ids = itertools.count()

    def submit(self, front: Front, body: bytes) -> None:
        rid = str(next(self.ids)).encode()
        self.waiting[rid] = (front, False)
        asyncio.ensure_future(self.redis.execute("LPUSH", QUEUE, rid + b"|" + body))

    async def listen(self, ready: asyncio.Event) -> None:
        """SUBSCRIBE on a connection of its own; each message is `rid|kind|data`: the first data line
        (FIRST), the end of the backend's answer (END) or why it failed (FAILED)."""
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
                    self.relay_back(*message[2].split(b"|", 2))

    def relay_back(self, rid: bytes, kind: bytes, data: bytes) -> None:
        front, started = self.waiting.get(rid, (None, False))
        if front is None:
            return
        if kind == FIRST:
            self.waiting[rid] = (front, True)
            front.first(data)
            return
        del self.waiting[rid]
        if kind == END and started:
            front.end()
        else:
            front.fail(data or b"the backend's answer had no token", started)

    async def serve(self, port: int) -> None:
        ready = asyncio.Event()
        listener = asyncio.create_task(self.listen(ready))
        await ready.wait()
        async with await open_front(self, port):
            await listener


class BackRelay:
    """Pops a request, posts it to the backend on a kept connection (the worker's own HTTP client),
    publishes the first content line, reads the answer to its end and publishes that end."""

    def __init__(self, redis_url: str, backend: str) -> None:
        self.inbox = LeanRedis(redis_url, blocking=True)
        self.redis = LeanRedis(redis_url)
        self.http = HTTP1Client(backend, {"content-type": "application/json"}, connect_timeout=5.0)

    async def run(self) -> None:
        await self.redis.execute("PING")
        print("ready", flush=True)
        while True:
            reply = await self.inbox.execute("BLMPOP", 1, 1, QUEUE, "RIGHT")
            if reply is None:
                continue
            rid, _, body = reply[1][0].partition(b"|")
            try:
                await self.relay(rid, body)
            except (HTTPClientError, ValueError) as error:  # told to the front, which answers 502
                self.publish(rid, FAILED, str(error).encode())

    def publish(self, rid: bytes, kind: bytes, data: bytes = b"") -> None:
        asyncio.ensure_future(self.redis.execute("PUBLISH", CHANNEL, b"|".join((rid, kind, data))))

    async def relay(self, rid: bytes, body: bytes) -> None:
        async def first(line: bytes) -> None:
            self.publish(rid, FIRST, line)

        await read_answer(self.http, body, first)
        self.publish(rid, END)


async def read_answer(http: HTTP1Client, body: bytes, first: Callable[[bytes], Awaitable[None]]) -> bool:
    """Posts `body` to the backend and reads its answer to the end, awaiting `first` with the first data line
    that carries content; returns whether there was one. A status other than 200 is a ValueError."""
    response = await http.post("/v1/chat/completions", body)
    try:
        if response.status != 200:
            raise ValueError(f"the backend answered {response.status}")
        sent, pending = False, b""
        async for data in response:
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if sent or not line.startswith(b"data: {"):
                    continue
                choices = orjson.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    sent = True
                    await first(line)
        return sent
    finally:
        response.release()


class OneProcessRelay:
    """The relay of `floor-one` (the module's doc): the API's place does the worker's job too, so Valkey
    answers it and wakes no other process."""

    def __init__(self, redis_url: str, backend: str) -> None:
        self.redis = LeanRedis(redis_url)
        self.http = HTTP1Client(backend, {"content-type": "application/json"}, connect_timeout=5.0)
        self.ids = itertools.count()

    def submit(self, front: Front, body: bytes) -> None:
        asyncio.ensure_future(self.relay(front, str(next(self.ids)).encode(), body))

    async def relay(self, front: Front, rid: bytes, body: bytes) -> None:
        started = False

        async def first(line: bytes) -> None:
            nonlocal started
            await self.redis.execute("SET", b"floor:t:" + rid, line, "EX", KEPT_SECONDS)  # kept before seen
            front.first(line)
            started = True

        try:
            await self.redis.execute("SET", b"floor:r:" + rid, body, "EX", KEPT_SECONDS)
            if await read_answer(self.http, body, first):
                front.end()
            else:
                front.fail(b"the backend's answer had no token", started=False)
        except Exception as error:  # the backend's, Valkey's (nothing unkept is sent), a malformed chunk's:
            front.fail(str(error).encode(), started)  # the client gets an answer either way

    async def serve(self, port: int) -> None:
        await self.redis.execute("PING")
        async with await open_front(self, port) as server:
            await server.serve_forever()


async def open_front(relay: FrontRelay | OneProcessRelay, port: int) -> asyncio.Server:
    """Clients' connections on `port`, each a `Front` of `relay`; says "ready" (what floor_chain waits for)."""
    server = await asyncio.get_running_loop().create_server(lambda: Front(relay), "127.0.0.1", port)
    print("ready", flush=True)
    return server


@contextlib.contextmanager
def floor_chain(backend_url: str, *, one_process: bool = False, redis_url: str | None = None) -> Iterator[str]:
    """A Valkey of its own (AOF, appendfsync everysec, as `serve` runs it; or the one at `redis_url`), the back
    relay in front of `backend_url` and the front relay (or, `one_process`, the one relay of `floor-one`);
    yields the base URL that clients call."""
    server = scratch_server(persistent=True) if redis_url is None else None
    url = server.url if server is not None else redis_url
    port = free_port()
    roles = ([["one", url, backend_url, str(port)]] if one_process
             else [["back", url, backend_url], ["front", url, str(port)]])
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for args in roles:
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
        if server is not None:
            server.stop()


def main(argv: list[str]) -> None:
    role, redis_url = argv[0], argv[1]
    if role == "front":
        uvloop.run(FrontRelay(redis_url).serve(int(argv[2])))
    elif role == "back":
        uvloop.run(BackRelay(redis_url, argv[2]).run())
    elif role == "one":
        uvloop.run(OneProcessRelay(redis_url, argv[2]).serve(int(argv[3])))
    else:
        raise SystemExit("usage: floor_relay front REDIS_URL PORT | back REDIS_URL BACKEND_URL"
                         " | one REDIS_URL BACKEND_URL PORT")


if __name__ == "__main__":
    main(sys.argv[1:])
