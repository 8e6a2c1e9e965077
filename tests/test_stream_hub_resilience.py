"""The event hub outlives a reset of its subscriber connection, and a reader `join` returned before its
channel was confirmed rereads the log at that confirmation.

The API runs under uvloop, which closes a transport as soon as it reads a reset (ECONNRESET), a loop
turn or two before the subscriber's link task wakes up to it: a write in that window raised
RuntimeError, which killed the hub's linger task (nothing gave subscriptions back for the rest of the
process's life) or failed a `join` after it had stored a channel no reader would ever leave. The reset
here is a real one: a relay in front of the real Valkey ends the subscriber's connection with an RST.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import uvloop

from sluicegate.sessions import keys
from sluicegate.sessions.hub import EventHub
from sluicegate.sessions.subscriber import Subscriber, _Link
from tests.helpers import ON_CLUSTER, until
from tests.test_hub_join_cancel import EVENT, server_subscribers

T = TypeVar("T")


def under_uvloop(scenario: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """As the API runs (sluicegate/cli.py): the window exists under uvloop only (asyncio drops the write)."""
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), timeout)
    return uvloop.run(bounded())


class ResettingRelay:
    """A TCP relay in front of the test's server; `reset()` ends its client connections with an RST
    (SO_LINGER 0), as a server that restarts or fails over does to a subscriber."""

    def __init__(self, redis_url: str) -> None:
        self._target = urlsplit(redis_url)
        self._clients: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> ResettingRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        auth = self._target.netloc.rpartition("@")[0]
        self.url = urlunsplit(self._target._replace(netloc=f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"))
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._clients):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._target.hostname, self._target.port)
        self._clients.add(writer)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                sink.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._clients.discard(writer)

    def reset(self) -> None:
        for writer in list(self._clients):
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


async def reset_into_the_window(relay: ResettingRelay, subscriber: Subscriber) -> _Link:
    """Resets the subscriber's connection and returns in the loop turn where uvloop has closed its transport's
    handle but the link's task has not seen the loss yet (`link.writer` is still set): a write now is what
    raised. (Closing at first, the transport drops writes; once closed, uvloop's repr says so.)"""
    (link,) = subscriber._links.values()
    writer = link.writer
    assert writer is not None, "not connected"
    relay.reset()
    deadline = time.monotonic() + 5
    while link.writer is writer:
        if "closed=True" in repr(writer.transport):
            return link
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0)
    raise AssertionError("the link's task saw the reset before the loop closed the transport: no window to test")


def shard_subscribers(r: redis.Redis, channel: str) -> int:
    return int(r.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])


# The reset comes from a relay in front of one server: a cluster's subscriber connects to the masters that
# CLUSTER SLOTS names, past any relay.
@pytest.mark.single_server
def test_a_subscribe_and_an_unsubscribe_in_the_turn_a_reset_is_read_do_not_raise(
        redis_url: str, r: redis.Redis) -> None:
    kept, added, dropped = (keys.session_channel(sid) for sid in ("kept", "added", "dropped"))

    async def scenario() -> None:
        relay = await ResettingRelay(redis_url).start()
        subscriber = Subscriber(relay.url, lambda *frame: None)
        subscriber.subscribe(kept)
        subscriber.subscribe(dropped)
        await subscriber.start()
        try:
            link = await reset_into_the_window(relay, subscriber)
            subscriber.subscribe(added)  # uvloop: "unable to perform operation on <TCPTransport closed=True>"
            subscriber.unsubscribe(dropped)
            assert link.writer is not None and not link.pending, "an unsent command left awaiting its reply"

            # The link reconnects and subscribes what it is left with, the new channel included.
            await until(lambda: link.writer is not None and subscriber.channels <= subscriber.confirmed,
                        "the resubscription")
            assert subscriber.channels == {kept, added}
            assert (shard_subscribers(r, kept), shard_subscribers(r, added), shard_subscribers(r, dropped)) == (1, 1, 0)
        finally:
            await subscriber.stop()
            await relay.stop()

    under_uvloop(scenario)


@pytest.mark.single_server  # (the relay: see above)
def test_a_join_in_the_turn_a_reset_is_read_returns_a_live_reader_and_its_channel_lingers_out(
        redis_url: str, r: redis.Redis) -> None:
    name = keys.session_channel("joined-in-the-window")

    async def scenario() -> None:
        relay = await ResettingRelay(redis_url).start()
        hub = EventHub(relay.url, linger_seconds=0.2, confirm_timeout=3.0)
        await hub.start()
        try:
            await reset_into_the_window(relay, hub._subscriber)
            async with asyncio.timeout(10):  # (not wait_for: the join must run in this very turn)
                reader = await hub.join("joined-in-the-window")
            channel = hub._channels[name]
            assert channel.confirmed.is_set() and channel.readers == {reader}
            assert r.spublish(name, EVENT) == 1
            batch = await asyncio.wait_for(reader.queue.get(), 5)
            assert [e.seq for e in batch] == [1]

            hub.leave("joined-in-the-window", reader)
            await until(lambda: name not in hub._channels, "the channel lingered out")
            await until(lambda: shard_subscribers(r, name) == 0, "the server's subscription released")
            assert hub._linger_task is not None and not hub._linger_task.done()
        finally:
            await hub.stop()
            await relay.stop()

    under_uvloop(scenario)


def test_the_linger_task_outlives_an_error_of_one_pass_and_still_releases_channels(
        redis_url: str, r: redis.Redis) -> None:
    """Any error of one pass (the write above was one) is logged; the loop alone gives subscriptions
    back, so it must go on, and the channels of the failed pass are released at a later one."""
    first, second = "linger-first", "linger-second"

    async def scenario() -> None:
        hub = EventHub(redis_url, cluster=ON_CLUSTER, linger_seconds=0.2)
        await hub.start()
        real_unsubscribe = hub._subscriber.unsubscribe
        failures = []

        def failing_once(*channels: str) -> None:
            if channels and not failures:
                failures.append(channels)
                raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")
            real_unsubscribe(*channels)

        hub._subscriber.unsubscribe = failing_once  # type: ignore[method-assign]
        try:
            hub.leave(first, await hub.join(first))
            await until(lambda: bool(failures), "the failing pass")
            await until(lambda: server_subscribers(r, keys.session_channel(first)) == 0,
                        "the failed pass's channel released later")
            assert hub.subscribed_sessions == 0
            hub.leave(second, await hub.join(second))
            await until(lambda: server_subscribers(r, keys.session_channel(second)) == 0, "a later channel released")
            assert hub._linger_task is not None and not hub._linger_task.done()
        finally:
            await hub.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def pause_server(r: Any, milliseconds: int) -> None:
    """Every client's commands wait (CLIENT PAUSE ALL), the subscriber's SSUBSCRIBE among them."""
    if ON_CLUSTER:
        r.execute_command("CLIENT", "PAUSE", milliseconds, "ALL", target_nodes="all")
    else:
        r.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")


def unpause_server(r: Any) -> None:
    if ON_CLUSTER:
        r.execute_command("CLIENT", "UNPAUSE", target_nodes="all")
    else:
        r.execute_command("CLIENT", "UNPAUSE")


def test_a_reader_returned_before_the_first_confirmation_rereads_the_log_at_it(
        redis_url: str, r: redis.Redis) -> None:
    """`join` gives up waiting (the server is slow or restarting) and its stream reads the log; what is
    published before the subscription is live is only in the log, so the first confirmation rereads it."""
    sid = "confirmed-late"
    name = keys.session_channel(sid)

    async def scenario() -> None:
        hub = EventHub(redis_url, cluster=ON_CLUSTER, linger_seconds=60, confirm_timeout=0.3)
        await hub.start()
        try:
            pause_server(r, 1500)
            reader = await hub.join(sid)
            channel = hub._channels[name]
            assert not channel.confirmed.is_set(), "confirmed already: the join did not give up waiting"
            assert not reader.overflowed
            await until(channel.confirmed.is_set, "the confirmation once the pause ends", timeout=10)
            assert reader.overflowed, "the reader was not sent back to the log at the first confirmation"
            assert reader.queue.get_nowait() == []  # its wake-up

            waited = await hub.join(sid)  # a join confirmed in time: its own log read follows, no reread
            assert not waited.overflowed and waited.queue.empty()
        finally:
            with contextlib.suppress(Exception):
                unpause_server(r)
            await hub.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))
