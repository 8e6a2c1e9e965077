"""A minimal RESP2 subscriber connection for the event hub.

Why not redis-py's PubSub: under load its SUBSCRIBE send could stall for seconds behind the
reader (measured: a stream's SUBSCRIBE left 5 s after the request finished), and per message it
costs more CPU than the whole fan-out. A subscriber connection needs very little: write
SUBSCRIBE/UNSUBSCRIBE without waiting, read push frames in one task, reconnect and resubscribe.
Readers never depend on it for correctness: the session log is the source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

from sessions.resp import RedisAddress, encode

log = logging.getLogger(__name__)

OnFrame = Callable[[bytes, bytes, bytes | None], None]  # kind, channel, payload


async def read_reply(reader: asyncio.StreamReader) -> object:
    """One RESP2 reply: bytes, int, None, list, or an Exception for an error reply."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("connection closed by the server")
    kind, body = line[:1], line[1:-2]
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = await reader.readexactly(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [await read_reply(reader) for _ in range(count)]
    if kind == b":":
        return int(body)
    if kind == b"+":
        return body
    if kind == b"-":
        return RuntimeError(body.decode(errors="replace"))
    raise ConnectionError(f"unexpected RESP frame {line[:20]!r}")


class Subscriber:
    """Owns one subscriber connection; `on_frame(kind, channel, payload)` sees every push frame."""

    def __init__(self, url: str, on_frame: OnFrame) -> None:
        self.address = RedisAddress.from_url(url)
        self.on_frame = on_frame
        self.channels: set[str] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writer is not None:
            self._writer.close()

    def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        self._send(encode(("SUBSCRIBE", channel)))

    def unsubscribe(self, *channels: str) -> None:
        self.channels.difference_update(channels)
        if channels:
            self._send(encode(("UNSUBSCRIBE", *channels)))

    def _send(self, data: bytes) -> None:
        # While disconnected nothing is sent: the reconnect resubscribes every channel in self.channels.
        if self._writer is not None and self.connected.is_set():
            self._writer.write(data)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        address = self.address
        context = ssl.create_default_context() if address.tls else None
        reader, writer = await asyncio.open_connection(address.host, address.port, ssl=context)
        for command in address.login(select_db=False):  # channels are not per database
            writer.write(encode(command))
            reply = await read_reply(reader)
            if isinstance(reply, Exception):
                raise ConnectionError(f"{command[0]} failed: {reply}")
        return reader, writer

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                reader, writer = await self._connect()
                self._writer = writer
                if self.channels:
                    writer.write(encode(("SUBSCRIBE", *sorted(self.channels))))
                self.connected.set()
                backoff = 0.05
                while True:
                    frame = await read_reply(reader)
                    if isinstance(frame, list) and len(frame) >= 3:
                        kind, channel, payload = frame[0], frame[1], frame[2]
                        self.on_frame(kind, channel, payload if isinstance(payload, bytes) else None)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure: reconnect and resubscribe
                log.warning("event subscriber connection lost (%s); reconnecting", error)
            finally:
                self.connected.clear()
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
