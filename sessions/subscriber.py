"""Minimal RESP2 subscriber connections (sharded pub/sub) for the event hub and the workers' control.

Why not redis-py's PubSub: under load its SUBSCRIBE send could stall for seconds behind the
reader (measured: a stream's SUBSCRIBE left 5 s after the request finished), and per message it
costs more CPU than the whole fan-out; its asyncio cluster client has no pub/sub at all. A
subscriber needs very little: write SSUBSCRIBE/SUNSUBSCRIBE without waiting, read push frames in one
task per connection, reconnect and resubscribe. Readers never depend on it for correctness: the
session log is the source of truth.

Sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis >= 7 and Valkey) works the same on one server and on a
cluster. On one server: one connection, every channel on it. On a cluster a shard channel lives on
the master that owns its slot and a message is delivered there only, so the subscriber keeps one
connection per master that has channels of it (never one per channel), routes each channel by its
slot (CLUSTER SLOTS, read from any node it can reach, logged in with the seed URL's credentials),
and names channels of one slot per SSUBSCRIBE (more get CROSSSLOT). When the cluster changes under
it (a MOVED or CROSSSLOT reply, a `sunsubscribe` the server pushes when a slot migrates or its
master becomes a replica, a lost connection) it reads the topology again and subscribes the channel
on its new master. Each (re)subscription is confirmed by an `ssubscribe` frame, which tells the hub
that what was published meanwhile is only in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable

import hiredis
from redis.crc import key_slot

from sluicegate.sessions.resp import RedisAddress, encode

log = logging.getLogger(__name__)

OnFrame = Callable[[bytes, bytes, bytes | None], None]  # kind, channel, payload
Node = tuple[str, int]

SMESSAGE = b"smessage"
SSUBSCRIBE = b"ssubscribe"
SUNSUBSCRIBE = b"sunsubscribe"
SLOTS = 16384
READ_SIZE = 1 << 16
MAX_BACKOFF = 2.0


async def next_reply(reader: asyncio.StreamReader, parser: hiredis.Reader) -> object:
    """The next reply on a connection: bytes, int, None, list, or a hiredis.ReplyError."""
    while (reply := parser.gets()) is False:
        data = await reader.read(READ_SIZE)
        if not data:
            raise ConnectionError("connection closed by the server")
        parser.feed(data)
    return reply


async def open_connection(address: RedisAddress, timeout: float, client_name: str | None = None
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, hiredis.Reader]:
    """A logged-in connection (no SELECT: channels are not per database) and its reply parser."""
    context = ssl.create_default_context() if address.tls else None
    if address.path:
        opening = asyncio.open_unix_connection(address.path)
    else:
        opening = asyncio.open_connection(address.host, address.port, ssl=context)
    reader, writer = await asyncio.wait_for(opening, timeout)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    parser = hiredis.Reader()
    try:
        for command in address.login(client_name, select_db=False):
            writer.write(encode(command))
            reply = await asyncio.wait_for(next_reply(reader, parser), timeout)
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"{command[0]} failed: {reply}")
    except BaseException:
        writer.close()
        raise
    return reader, writer, parser


async def read_slot_owners(address: RedisAddress, timeout: float) -> list[tuple[int, int, Node]]:
    """(first slot, last slot, master) ranges, from CLUSTER SLOTS asked of the node at `address`.

    A server with cluster support disabled owns every slot itself, so cluster mode works there too."""
    reader, writer, parser = await open_connection(address, timeout)
    try:
        writer.write(encode(("CLUSTER", "SLOTS")))
        reply = await asyncio.wait_for(next_reply(reader, parser), timeout)
    finally:
        writer.close()
    if isinstance(reply, hiredis.ReplyError):
        if "cluster support disabled" in str(reply):
            return [(0, SLOTS - 1, (address.host, address.port))]
        raise ConnectionError(f"CLUSTER SLOTS failed: {reply}")
    ranges: list[tuple[int, int, Node]] = []
    for entry in reply if isinstance(reply, list) else ():
        first, last, master = entry[0], entry[1], entry[2]
        host = master[0].decode() if master[0] not in (b"", b"?", None) else address.host  # "": the node we asked
        ranges.append((int(first), int(last), (host, int(master[1]))))
    return ranges


class _Link:
    """One connection to one node: the channels routed to it, and its commands awaiting replies."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.channels: set[str] = set()
        self.writer: asyncio.StreamWriter | None = None  # set while connected and logged in
        # (reply kind, channels still to be confirmed) per command sent, oldest first: the replies of
        # a subscriber connection come in order, so an error reply names the command it answers.
        self.pending: deque[tuple[bytes, deque[bytes]]] = deque()
        self.task: asyncio.Task[None] | None = None


class Subscriber:
    """Subscriber connections; `on_frame(kind, channel, payload)` sees every push frame (`smessage`
    with its payload; `ssubscribe`, `sunsubscribe` with None).

    `cluster=False`: one connection to the server of `url`. `cluster=True`: `url` names any node of a
    Redis Cluster; at most one connection per master. `client_name` names them in `CLIENT LIST`.
    """

    def __init__(self, url: str, on_frame: OnFrame, *, cluster: bool = False, client_name: str | None = None,
                 connect_timeout: float = 5.0) -> None:
        self.address = RedisAddress.from_url(url)
        self.on_frame = on_frame
        self.cluster = cluster
        self.client_name = client_name
        self.connect_timeout = connect_timeout
        self.channels: set[str] = set()  # wanted
        self.confirmed: set[str] = set()  # wanted, and confirmed by the master that owns them now
        self._seed: Node = (self.address.host, self.address.port)
        self._links: dict[Node, _Link] = {}
        self._route: dict[str, _Link] = {}  # channel -> the link it is subscribed (or to be) on
        self._slots: dict[str, int] = {}  # channel -> its slot (cluster mode)
        self._owners: list[Node | None] = []  # slot -> its master (cluster mode; empty until read)
        self._lost: set[str] = set()  # channels to place again once the topology is read again
        self._repair_wanted = asyncio.Event()
        self._repair_task: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()  # loops of closed links, still closing
        self._running = False

    # ---- public ----------------------------------------------------------------------------
    @property
    def connection_count(self) -> int:
        """Connections open now (at most one per master)."""
        return sum(1 for link in self._links.values() if link.writer is not None)

    async def start(self, timeout: float = 10.0) -> None:
        """Connect (one server: its connection; a cluster: read its topology) and return once every
        channel subscribed before start() is confirmed; TimeoutError if that takes over `timeout`."""
        self._running = True
        self._repair_task = asyncio.create_task(self._repair_loop())
        if not self.cluster:
            self._open_link(self._seed)
        self._lost.update(self.channels)
        self._repair_wanted.set()
        try:
            await self.wait_ready(timeout)
        except BaseException:
            await self.stop()
            raise

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Until connected (a cluster: its topology read) and every wanted channel confirmed."""
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                where = "the cluster at" if self.cluster else "the server at"
                raise TimeoutError(f"subscriptions not confirmed by {where} {self._where(self._seed)} "
                                   f"within {timeout:g} s")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._running = False
        tasks = [task for task in (self._repair_task, *self._retired, *(link.task for link in self._links.values()))
                 if task]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for link in self._links.values():
            if link.writer is not None:
                link.writer.close()
                link.writer = None
        self._links.clear()
        self._route.clear()
        self.confirmed.clear()

    def subscribe(self, channel: str) -> None:
        """Subscribe without waiting: the `ssubscribe` frame tells when it is live."""
        if channel in self.channels:
            return
        self.channels.add(channel)
        if self._running:
            self._place([channel])

    def unsubscribe(self, *channels: str) -> None:
        groups: dict[tuple[_Link, int], list[str]] = defaultdict(list)
        for channel in channels:
            if channel not in self.channels:
                continue
            self.channels.discard(channel)
            self.confirmed.discard(channel)
            self._lost.discard(channel)
            slot = self._slots.pop(channel, 0)
            link = self._route.pop(channel, None)
            if link is not None:
                link.channels.discard(channel)
                groups[link, slot].append(channel)
        for (link, _), names in groups.items():
            self._send(link, SUNSUBSCRIBE, names)

    # ---- routing ---------------------------------------------------------------------------
    def _slot(self, channel: str) -> int:
        if not self.cluster:
            return 0  # one server: any channels in one command
        slot = self._slots.get(channel)
        if slot is None:
            slot = self._slots[channel] = key_slot(channel.encode())
        return slot

    def _where(self, node: Node) -> str:
        """A node as a log line names it (a Unix socket: its path)."""
        return self.address.path or f"{node[0]}:{node[1]}"

    def _node(self, channel: str) -> Node | None:
        if not self.cluster:
            return self._seed
        return self._owners[self._slot(channel)] if self._owners else None

    def _place(self, channels: Iterable[str]) -> None:
        """Route each channel to the master owning it now and subscribe it there (one command per
        node and slot); a channel with no known master waits for the next topology read."""
        groups: dict[tuple[_Link, int], list[str]] = defaultdict(list)
        for channel in channels:
            node = self._node(channel)
            old = self._route.get(channel)
            if node is None:
                if old is not None:
                    old.channels.discard(channel)
                    del self._route[channel]
                self.confirmed.discard(channel)
                self._lost.add(channel)
                self._repair_wanted.set()
                continue
            link = self._links.get(node) or self._open_link(node)
            if old is not link:
                if old is not None:
                    old.channels.discard(channel)
                link.channels.add(channel)
                self._route[channel] = link
                self.confirmed.discard(channel)
            groups[link, self._slot(channel)].append(channel)
        for (link, _), names in groups.items():
            self._send(link, SSUBSCRIBE, names)

    def _send(self, link: _Link, kind: bytes, channels: list[str]) -> None:
        # While disconnected nothing is sent: the link subscribes all its channels when it reconnects.
        writer = link.writer
        if writer is None:
            return
        link.pending.append((kind, deque(name.encode() for name in channels)))
        try:
            writer.write(encode((kind.upper(), *channels)))
        except (RuntimeError, OSError) as error:
            # uvloop closes a transport as it reads a reset, a loop turn or two before the link's task
            # learns of it, and a write meanwhile raises (asyncio's drops it). Nothing is lost: the link
            # reconnects and subscribes its channels again (an unsubscribed one is no longer among them).
            # The caller (the hub's join, its linger pass) must not fail for it.
            link.pending.pop()
            writer.close()  # (already closed, usually) the link's task sees the loss and reconnects
            log.debug("subscriber connection to %s lost during a write (%s)", self._where(link.node), error)

    def _ready(self) -> bool:
        if self.cluster:
            connected = bool(self._owners)
        else:
            link = self._links.get(self._seed)
            connected = link is not None and link.writer is not None
        return connected and self.channels <= self.confirmed

    # ---- connections -----------------------------------------------------------------------
    def _open_link(self, node: Node) -> _Link:
        link = self._links[node] = _Link(node)
        link.task = asyncio.create_task(self._link_loop(link))
        return link

    def _close_link(self, link: _Link) -> None:
        del self._links[link.node]
        if link.task is not None:
            link.task.cancel()  # its loop closes the connection
            self._retired.add(link.task)
            link.task.add_done_callback(self._retired.discard)

    async def _link_loop(self, link: _Link) -> None:
        address = dataclasses.replace(self.address, host=link.node[0], port=link.node[1])
        backoff = 0.05
        while True:
            try:
                reader, writer, parser = await open_connection(address, self.connect_timeout, self.client_name)
                link.writer = writer
                link.pending.clear()
                by_slot: dict[int, list[str]] = defaultdict(list)
                for channel in link.channels:
                    by_slot[self._slot(channel)].append(channel)
                for names in by_slot.values():
                    self._send(link, SSUBSCRIBE, sorted(names))
                backoff = 0.05
                await self._read_frames(link, reader, parser)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure: reconnect and resubscribe
                log.warning("subscriber connection to %s lost (%s); reconnecting", self._where(link.node), error)
            finally:
                writer, link.writer = link.writer, None
                link.pending.clear()
                self.confirmed.difference_update(link.channels)
                if writer is not None:  # closed before stop() returns, cancelled or not
                    writer.close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.wait_closed(), 1.0)
            if self.cluster:  # the node may be gone for good (its slots failed over): read the topology
                self._repair_wanted.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _read_frames(self, link: _Link, reader: asyncio.StreamReader, parser: hiredis.Reader) -> None:
        on_frame = self.on_frame
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("connection closed by the server")
            parser.feed(data)
            while (frame := parser.gets()) is not False:
                if type(frame) is list and len(frame) == 3 and frame[0] == SMESSAGE:  # the hot path
                    on_frame(SMESSAGE, frame[1], frame[2])
                else:
                    self._on_reply(link, frame)

    def _on_reply(self, link: _Link, frame: object) -> None:
        if isinstance(frame, hiredis.ReplyError):  # MOVED, CROSSSLOT, CLUSTERDOWN, ...: its command failed
            kind, names = link.pending.popleft() if link.pending else (b"", deque())
            log.warning("%s on %s refused (%s); rerouting", kind.decode().upper() or "a command",
                        self._where(link.node), frame)
            if kind == SSUBSCRIBE:
                self._relocate(link, names)
            return
        if not (isinstance(frame, list) and len(frame) >= 3 and isinstance(frame[1], bytes)):
            return
        kind, channel = frame[0], frame[1]
        expected = link.pending[0] if link.pending else None
        is_reply = expected is not None and expected[0] == kind and bool(expected[1]) and expected[1][0] == channel
        if expected is not None and is_reply:
            expected[1].popleft()
            if not expected[1]:
                link.pending.popleft()
        name = channel.decode()
        if kind == SSUBSCRIBE:
            if self._route.get(name) is link:
                self.confirmed.add(name)
        elif kind == SUNSUBSCRIBE and not is_reply:
            # Pushed by the server: the slot moved to another master, or this one became a replica.
            self._relocate(link, [channel])
        self.on_frame(kind, channel, None)

    def _relocate(self, link: _Link, channels: Iterable[bytes]) -> None:
        """Channels this link no longer serves: subscribe them again after reading the topology."""
        for channel in channels:
            name = channel.decode()
            if name in self.channels and self._route.get(name) is link:
                self.confirmed.discard(name)
                self._lost.add(name)
        self._repair_wanted.set()

    # ---- topology --------------------------------------------------------------------------
    async def _repair_loop(self) -> None:
        """Read the topology (cluster mode) and place the lost channels; backs off while it repeats."""
        delay, last = 0.0, float("-inf")
        while True:
            await self._repair_wanted.wait()
            self._repair_wanted.clear()
            delay = 0.0 if time.monotonic() - last > MAX_BACKOFF else min(max(delay * 2, 0.05), MAX_BACKOFF)
            await asyncio.sleep(delay)
            last = time.monotonic()
            try:
                if self.cluster:
                    await self._read_topology()
                self._apply_topology()
            except Exception as error:  # noqa: BLE001 - no node reachable now: try again
                log.warning("cannot read the cluster topology (%s); retrying", error)
                self._repair_wanted.set()

    async def _read_topology(self) -> None:
        candidates = list(dict.fromkeys([self._seed, *self._links, *(node for node in self._owners if node)]))
        errors: list[str] = []
        for node in candidates:
            address = dataclasses.replace(self.address, host=node[0], port=node[1])
            try:
                ranges = await read_slot_owners(address, min(self.connect_timeout, 2.0))
            except (OSError, ConnectionError, TimeoutError) as error:
                errors.append(f"{node[0]}:{node[1]}: {error or type(error).__name__}")
                continue
            owners: list[Node | None] = [None] * SLOTS
            for first, last, master in ranges:
                owners[first:last + 1] = [master] * (last - first + 1)
            self._owners = owners
            return
        raise ConnectionError("; ".join(errors))

    def _apply_topology(self) -> None:
        """Move the channels whose master changed, place the lost ones, close links to ex-masters."""
        lost, self._lost = self._lost, set()
        moved = []
        for channel in self.channels:
            link = self._route.get(channel)
            if channel in lost or link is None or link.node != self._node(channel):
                moved.append(channel)
        self._place(moved)
        if self.cluster:
            masters = set(self._owners)
            for link in [link for node, link in self._links.items() if node not in masters and not link.channels]:
                self._close_link(link)
