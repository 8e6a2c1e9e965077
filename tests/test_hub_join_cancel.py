"""A join cancelled while it waits for its subscription's confirmation leaves the hub again.

No caller gets the reader of a cancelled join (sessions/stream.py, api/streaming.py), so only the hub
can take it out; left in, the channel stayed subscribed for good and its queue filled with every batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect

import redis

from sluicegate.api.deadline import RESPONSE_DEADLINE_SECONDS
from sluicegate.sessions import hub as hub_module
from sluicegate.sessions import keys
from sluicegate.sessions.hub import EventHub
from tests.helpers import ON_CLUSTER, until

EVENT = "1|token|r1|{}"  # one entry of a log append, as the scripts publish it


def server_subscribers(r: redis.Redis, channel: str) -> int:
    """Subscribers of a shard channel on the server (on a cluster, summed over its nodes)."""
    if ON_CLUSTER:
        replies = r.execute_command("PUBSUB", "SHARDNUMSUB", channel, target_nodes="all")  # type: ignore[call-arg]
        return sum(int(reply[1]) for reply in replies.values())
    return int(r.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])


def test_a_join_cancelled_before_its_confirmation_leaves_and_the_channel_is_released(
        redis_url: str, r: redis.Redis) -> None:
    sid = "cancelled-join"
    name = keys.session_channel(sid)

    async def scenario() -> None:
        hub = EventHub(redis_url, cluster=ON_CLUSTER, linger_seconds=0.2)
        await hub.start()
        try:
            staying = asyncio.create_task(hub.join(sid))  # another reader that waits for the same channel
            leaving = asyncio.create_task(hub.join(sid))
            await asyncio.sleep(0)  # both now wait: the confirmation needs a round trip to the server
            channel = hub._channels[name]
            assert not channel.confirmed.is_set(), "confirmed already: the test did not cancel mid-wait"
            assert len(channel.readers) == 2
            leaving.cancel()  # the client left, or the response deadline fired
            with contextlib.suppress(asyncio.CancelledError):
                await leaving
            assert leaving.cancelled()
            kept = await staying
            assert channel.readers == {kept}, "the cancelled join's reader was left in the hub"

            # The other reader still gets what is published, and once it leaves the channel lingers out.
            assert r.spublish(name, EVENT) == 1
            batch = await asyncio.wait_for(kept.queue.get(), 5)
            assert [e.seq for e in batch] == [1]
            hub.leave(sid, kept)
            await until(lambda: name not in hub._channels, "the channel lingered out")
            await until(lambda: server_subscribers(r, name) == 0, "the server's subscription released")

            # Alone: a lone cancelled join leaves nothing behind either.
            lone = asyncio.create_task(hub.join(sid))
            await asyncio.sleep(0)
            assert not hub._channels[name].confirmed.is_set()
            lone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lone
            assert not hub._channels[name].readers, "the cancelled join's reader was left in the hub"
            await until(lambda: hub.subscribed_sessions == 0, "the channel lingered out")
            await until(lambda: server_subscribers(r, name) == 0, "the server's subscription released")
        finally:
            await hub.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_join_cancelled_as_its_confirmation_comes_still_leaves(redis_url: str) -> None:
    """The confirmation and the client's leaving in the same loop turn: Python 3.11's asyncio.wait_for
    swallowed a cancel that came once the wait was done, and the join returned a reader to a caller that
    had gone (its stream then pinged nobody for good, holding a max_streams place)."""
    sid = "raced-join"

    async def scenario() -> None:
        hub = EventHub(redis_url, cluster=ON_CLUSTER, linger_seconds=0.2)
        await hub.start()
        try:
            joining = asyncio.create_task(hub.join(sid))
            await asyncio.sleep(0)
            channel = hub._channels[keys.session_channel(sid)]
            assert not channel.confirmed.is_set(), "confirmed already: the test did not race the confirmation"
            channel.confirmed.set()  # the server's confirmation is read...
            joining.cancel()  # ...and the client's FIN in the same turn
            with contextlib.suppress(asyncio.CancelledError):
                await joining
            assert joining.cancelled(), "the join swallowed its cancel and returned a reader"
            assert not channel.readers, "the cancelled join's reader was left in the hub"
        finally:
            await hub.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_the_confirm_wait_ends_before_the_response_deadline() -> None:
    """A request stream joins before its response starts: the documented "returned anyway" path can only
    happen if the hub gives up on the confirmation before api/deadline.py turns the response into a 503."""
    assert hub_module.CONFIRM_TIMEOUT_SECONDS < RESPONSE_DEADLINE_SECONDS
    default = inspect.signature(EventHub).parameters["confirm_timeout"].default
    assert default == hub_module.CONFIRM_TIMEOUT_SECONDS
