"""Calling the function library (sessions/library.py) with FCALL.

Redis >= 7.0 and Valkey have functions. A function library is loaded once and kept by the server,
persisted with its data; sent as EVALSHA scripts, every call re-ran the shared definitions first,
which measured about 37 µs of server time per call (most of a small script's cost). A server that
lost the library (a fresh or flushed server, a failover, a new master after resharding) gets it again
on the first call that finds it missing: on a cluster every master is loaded, since functions are
not copied between shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis import Redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import ResponseError

from sluicegate.sessions.connect import async_node_for_key, node_for_key
from sluicegate.sessions.library import FUNCTIONS, function_name, library_source
from sluicegate.sessions.resp import LeanRedis

__all__ = ["Scripts", "FUNCTIONS"]


def _library_missing(error: ResponseError) -> bool:
    return "function not found" in str(error).lower()


def _library_exists(error: ResponseError) -> bool:
    return "already exists" in str(error).lower()


class Scripts:
    """The library's functions for one Redis client: `await scripts.call("submit", keys, args)`
    (for redis-py's synchronous clients the call returns the reply itself). The first argument of
    every function is the call's flags: "S" when both planes live on this one server, "T" when the
    clock is pinned (tests only)."""

    def __init__(self, client: Any, *, single_server: bool = True, pinned_clock: bool = False) -> None:
        self.client = client
        self.single_server = single_server
        self.flags = ("S" if single_server else "C") + ("T" if pinned_clock else "")
        self._sync = isinstance(client, (Redis, RedisCluster))  # redis-py's blocking clients; others are awaited

    def _fcall(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        fname = function_name(name)
        if isinstance(self.client, LeanRedis):
            return self.client.execute("FCALL", fname, len(keys), *keys, self.flags, *args)
        if isinstance(self.client, RedisCluster):  # routed here: see _fcall_cluster
            return self.client.execute_command("FCALL", fname, len(keys), *keys, self.flags, *args,
                                               target_nodes=node_for_key(self.client, keys[0]))
        if isinstance(self.client, AsyncRedisCluster):
            return self._fcall_cluster(fname, keys, args)
        return self.client.fcall(fname, len(keys), *keys, self.flags, *args)

    async def _fcall_cluster(self, fname: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """An FCALL sent to the master of its first key's slot. redis-py's cluster clients would first
        ask a server COMMAND GETKEYS for every FCALL (a round trip more per call: measured 398 -> 117 us
        an idle call on the asyncio client). They still follow MOVED and ASK; a lost connection is not
        retried here, as for one server: the callers' own retries and 503s handle it."""
        node = await async_node_for_key(self.client, keys[0])
        return await self.client.execute_command("FCALL", fname, len(keys), *keys, self.flags, *args,
                                                 target_nodes=node)

    def load(self) -> Any:
        """Load the library where it is missing: on the server, or on every master of a cluster.

        Never with REPLACE: a library of this name is this code (its name carries the source's digest),
        and loading it again would restart its boot id (sessions/lua/includes/log_ids.lua), so that every
        session's next event skipped LOG_ID_JUMP ids. Processes that start together all find the library
        missing and all load it: the first wins, the others are told it exists. Sent to each master, a
        load is not retried on a lost connection (connect.py), as an FCALL is not: after a failover the
        call that finds the library missing fails once, and the next one loads the new master."""
        if not self._sync:
            return self._load_async()
        for node in self._nodes():
            try:
                self.client.execute_command("FUNCTION", "LOAD", library_source(), **node)
            except ResponseError as error:
                if not _library_exists(error):
                    raise
        return None

    async def _load_async(self) -> None:
        if isinstance(self.client, AsyncRedisCluster):
            await self.client.initialize()  # its masters known (a no-op once they are)
        for node in self._nodes():
            try:
                if isinstance(self.client, LeanRedis):
                    await self.client.execute("FUNCTION", "LOAD", library_source())
                else:
                    await self.client.execute_command("FUNCTION", "LOAD", library_source(), **node)
            except ResponseError as error:
                if not _library_exists(error):
                    raise

    def _nodes(self) -> list[dict[str, Any]]:
        """The targets of a load, as execute_command's keyword arguments: each master of a cluster
        (functions are not copied between shards), or the one server."""
        if isinstance(self.client, (RedisCluster, AsyncRedisCluster)):
            return [{"target_nodes": node} for node in self.client.get_primaries()]
        return [{}]

    async def ready(self) -> None:
        """The next call goes out with no wait before it is written (a LeanRedis connected now); a no-op for
        redis-py's clients, which connect inside the call."""
        if isinstance(self.client, LeanRedis):
            await self.client.ready()

    def call(self, name: str, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        if self._sync:
            try:
                return self._fcall(name, keys, args)
            except ResponseError as error:
                if not _library_missing(error):
                    raise
            self.load()
            return self._fcall(name, keys, args)
        return self._call_async(name, keys, args)

    async def _call_async(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self._fcall(name, keys, args)
        except ResponseError as error:
            if not _library_missing(error):
                raise
        await self.load()
        return await self._fcall(name, keys, args)
