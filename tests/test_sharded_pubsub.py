"""Sharded pub/sub (SSUBSCRIBE/SPUBLISH) through sessions/subscriber.py and the hub, on one server
and on a real 3-master cluster: routing by slot, few connections, slot moves and node restarts."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from sluicegate.embedded import EmbeddedCluster, EmbeddedServer
from sluicegate.sessions import keys
from sluicegate.sessions.hub import EventHub
from sluicegate.sessions.subscriber import Subscriber
from tests.cluster_helpers import start_test_cluster
from tests.helpers import until

pytestmark = pytest.mark.own_servers  # its own servers

T = TypeVar("T")
EVENT = "1|token|r1|{}"  # one entry of a log append, as the scripts publish it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """Our own cluster: one test here kills and restarts a node."""
    running = start_test_cluster(tmp_path_factory.mktemp("sharded-pubsub-cluster"))
    yield running
    running.stop()


def run(scenario: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), timeout)
    return asyncio.run(bounded())


def subscriber_ids(client: redis.Redis) -> list[int]:
    """Ids of the clients subscribed to shard channels on one server (CLIENT LIST's ssub field)."""
    return [int(entry["id"]) for entry in client.client_list() if int(entry.get("ssub", 0)) > 0]


def node_clients(cluster: EmbeddedCluster) -> list[redis.Redis]:
    return [redis.Redis(host=cluster.host, port=port, decode_responses=True) for port in cluster.ports]


def slot_owner_index(cluster: EmbeddedCluster, slot: int) -> int:
    with cluster.client(0) as node:
        for first, last, master, *_ in node.execute_command("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return cluster.ports.index(int(master[1]))
    raise AssertionError(f"slot {slot} has no master")


class Frames:
    """An on_frame callback that records what arrives, per kind and channel."""

    def __init__(self) -> None:
        self.seen: dict[bytes, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))

    def __call__(self, kind: bytes, channel: bytes, payload: bytes | None) -> None:
        self.seen[kind][channel.decode()].append(payload)

    def messages(self, channel: str) -> list[Any]:
        return self.seen[b"smessage"][channel]


# ---- one server -------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_spublish_reaches_a_hub_reader_over_one_connection_and_again_after_it_is_killed(
        transport: str, valkey_server: EmbeddedServer, redis_url: str, r: redis.Redis) -> None:
    """Over TCP, and over the Unix socket that serve's processes use for its embedded server."""
    sessions = ["alpha", "beta", "gamma"]
    url = redis_url if transport == "tcp" else valkey_server.local_url
    assert url.startswith("unix://" if transport == "unix" else "redis://")

    async def scenario() -> None:
        hub = EventHub(url, linger_seconds=60)
        await hub.start()
        try:
            readers = {sid: await hub.join(sid) for sid in sessions}  # each returns once confirmed
            assert len(subscriber_ids(r)) == 1, "the hub must multiplex every session over one connection"
            (flags,) = [c["flags"] for c in r.client_list() if int(c.get("ssub", 0)) > 0]
            assert ("U" in flags) == (transport == "unix"), flags
            for sid in sessions:
                assert r.execute_command("PUBSUB", "SHARDNUMSUB", keys.session_channel(sid))[1] == 1
                assert r.spublish(keys.session_channel(sid), EVENT) == 1
            for sid, reader in readers.items():
                batch = await asyncio.wait_for(reader.queue.get(), 5)
                assert [(e.seq, e.name, e.request_id) for e in batch] == [(1, "token", "r1")], sid
                assert not reader.overflowed

            # The connection dies: the hub reconnects, resubscribes every channel (one server takes
            # channels of many slots in one SSUBSCRIBE) and sends its readers back to the log.
            (victim,) = subscriber_ids(r)
            r.client_kill_filter(_id=victim)
            await until(lambda: all(reader.overflowed for reader in readers.values()), "the readers told to reread")
            await until(lambda: len(subscriber_ids(r)) == 1 and subscriber_ids(r) != [victim], "a new connection")
            for sid, reader in readers.items():
                reader.overflowed = False
                while not reader.queue.empty():
                    reader.queue.get_nowait()
                assert r.spublish(keys.session_channel(sid), "2|token|r1|{}") == 1
                batch = await asyncio.wait_for(reader.queue.get(), 5)
                assert [e.seq for e in batch] == [2], sid
        finally:
            await hub.stop()
        assert await_gone(r), "the hub's connection outlived stop()"

    run(scenario)


def await_gone(client: redis.Redis, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while subscriber_ids(client):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_subscription_is_confirmed_before_start_returns(redis_url: str, r: redis.Redis) -> None:
    """What the worker relies on: a channel subscribed before start() is live when start() returns."""
    channel = keys.worker_control("default", "w-1")

    async def scenario() -> None:
        frames = Frames()
        subscriber = Subscriber(redis_url, frames)
        subscriber.subscribe(channel)
        await subscriber.start()
        try:
            assert frames.seen[b"ssubscribe"][channel] == [None]
            assert subscriber.connection_count == 1
            assert r.spublish(channel, "rid|1|priority") == 1
            await until(lambda: frames.messages(channel) == [b"rid|1|priority"], "the notice")
        finally:
            await subscriber.stop()

    run(scenario)


# ---- a 3-master cluster -----------------------------------------------------------------------
def test_channels_of_200_hash_tags_all_receive_on_a_cluster_over_at_most_one_connection_per_master(
        cluster: EmbeddedCluster) -> None:
    channels = [f"sg:{{t{index}}}:e:s{index}" for index in range(200)]
    channels += [f"sg:{{t0}}:e:other{index}" for index in range(5)]  # several channels of one slot
    assert len({key_slot(c.encode()) for c in channels}) == 200
    assert len({slot_owner_index(cluster, key_slot(c.encode())) for c in channels[:200]}) == 3
    nodes = node_clients(cluster)
    publisher = RedisCluster.from_url(cluster.url)

    async def scenario() -> None:
        frames = Frames()
        subscriber = Subscriber(cluster.url, frames, cluster=True)
        for channel in channels[:100]:  # some before start (subscribed as the links connect) ...
            subscriber.subscribe(channel)
        await subscriber.start()
        for channel in channels[100:]:  # ... and the rest once running
            subscriber.subscribe(channel)
        try:
            await subscriber.wait_ready(10)
            assert subscriber.connection_count == 3
            assert sum(len(subscriber_ids(node)) for node in nodes) == 3
            for channel in channels:
                assert await asyncio.to_thread(publisher.spublish, channel, f"to {channel}") == 1, channel
            await until(lambda: all(frames.messages(c) for c in channels), "every channel's message")
            assert all(frames.messages(c) == [f"to {c}".encode()] for c in channels)

            # Unsubscribing half (channels of many slots on each connection) removes them everywhere.
            gone = channels[::2]
            subscriber.unsubscribe(*gone)
            await until(lambda: all(frames.seen[b"sunsubscribe"][c] for c in gone), "the unsubscribe replies")
            for channel in gone:
                assert await asyncio.to_thread(publisher.spublish, channel, "late") == 0, channel
            assert subscriber.connection_count == 3
        finally:
            await subscriber.stop()
        assert all(await_gone(node) for node in nodes), "a connection outlived stop()"

    try:
        run(scenario)
    finally:
        publisher.close()
        for node in nodes:
            node.close()


def test_a_hub_reader_follows_its_channel_when_the_slot_moves_to_another_master(cluster: EmbeddedCluster) -> None:
    sid = "moving"
    channel = keys.session_channel(sid)
    slot = key_slot(channel.encode())
    source = slot_owner_index(cluster, slot)
    target = (source + 1) % len(cluster.ports)
    nodes = node_clients(cluster)
    ids = [node.execute_command("CLUSTER", "MYID") for node in nodes]

    def move_slot(to: int) -> None:
        # importing side first, then the one giving it up (which tells its subscribers: sunsubscribe)
        for index in (to, *(i for i in range(len(nodes)) if i != to)):
            nodes[index].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to])

    async def scenario() -> None:
        hub = EventHub(cluster.url, cluster=True, linger_seconds=60)
        await hub.start()
        try:
            reader = await hub.join(sid)
            assert nodes[source].execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1
            await asyncio.to_thread(move_slot, target)
            # the hub resubscribes on the new master and sends its reader back to the log
            await until(lambda: reader.overflowed, "the reader told to reread")
            await until(lambda: nodes[target].execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1,
                        "the subscription on the new master")
            assert nodes[target].spublish(channel, EVENT) == 1
            while True:
                batch = await asyncio.wait_for(reader.queue.get(), 5)
                if batch:  # skip the empty wake-up of the reread
                    break
            assert [e.seq for e in batch] == [1]
        finally:
            await hub.stop()
            await asyncio.to_thread(move_slot, source)

    try:
        run(scenario)
    finally:
        for node in nodes:
            node.close()


def test_after_a_master_is_killed_and_restarted_the_subscriber_reconnects_and_receives_again(
        cluster: EmbeddedCluster) -> None:
    channels = [f"sg:{{r{index}}}:ctl" for index in range(30)]
    owners = {c: slot_owner_index(cluster, key_slot(c.encode())) for c in channels}
    victim = 0  # the seed node: the topology must then be read from the others
    on_victim = [c for c in channels if owners[c] == victim]
    assert on_victim and len(set(owners.values())) == 3

    def publish_all(tag: str) -> list[int]:
        with RedisCluster.from_url(cluster.node_url(1)) as publisher:
            return [publisher.spublish(channel, f"{tag} {channel}") for channel in channels]

    async def scenario() -> None:
        frames = Frames()
        subscriber = Subscriber(cluster.url, frames, cluster=True)
        for channel in channels:
            subscriber.subscribe(channel)
        await subscriber.start()
        try:
            assert subscriber.connection_count == 3
            assert await asyncio.to_thread(publish_all, "before") == [1] * len(channels)
            await until(lambda: all(frames.messages(c) for c in channels), "the messages before the crash")

            await asyncio.to_thread(cluster.kill_node, victim)  # kill -9
            await until(lambda: subscriber.connection_count == 2, "the subscriber to notice the crash")
            assert not set(on_victim) & subscriber.confirmed
            await asyncio.to_thread(cluster.start_node, victim)  # same port, same nodes.conf
            await subscriber.wait_ready(10)  # reconnected, and every channel confirmed again
            assert subscriber.connection_count == 3
            for channel in on_victim:  # the hub's cue to send readers back to the log
                assert frames.seen[b"ssubscribe"][channel] == [None, None], channel

            delivered = await asyncio.to_thread(publish_all, "after")
            assert delivered == [1] * len(channels)
            await until(lambda: all(len(frames.messages(c)) == 2 for c in channels), "the messages after it")
            assert all(frames.messages(c)[-1] == f"after {c}".encode() for c in channels)
        finally:
            await subscriber.stop()

    try:
        run(scenario, timeout=30)
    finally:
        cluster.wait_ok(15)


def test_cluster_mode_also_works_on_a_single_server(redis_url: str, r: redis.Redis) -> None:
    """A server with cluster support disabled owns every slot: cluster=True needs no special case."""

    async def scenario() -> None:
        frames = Frames()
        subscriber = Subscriber(redis_url, frames, cluster=True)
        channels = [f"sg:{{t{index}}}:e:x" for index in range(10)]
        for channel in channels:
            subscriber.subscribe(channel)
        await subscriber.start()
        try:
            assert subscriber.connection_count == 1
            for channel in channels:
                assert r.spublish(channel, "x") == 1
            await until(lambda: all(frames.messages(c) == [b"x"] for c in channels), "every message")
        finally:
            await subscriber.stop()

    run(scenario)
