"""Whether the store may evict keys: DESIGN's first invariant ("a 202 means the request is in Redis") holds
only under `maxmemory-policy noeviction`. Under allkeys-* an accepted request can vanish after its 202; under
volatile-* (a common default of managed Redis) an idle session's meta and log, which carry a TTL, are evicted
one without the other. Read from INFO memory, not CONFIG GET, which managed services often disable.

/readyz fails while a server evicts (api/operator_routes.py); the API, scheduler and worker log an ERROR
at start (sluicegate/cli.py). Neither refuses to run: a policy fixed at runtime needs no restart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from sluicegate.sessions.connect import CONNECT_TIMEOUT, UNAVAILABLE, AsyncClient, async_client

log = logging.getLogger("sluicegate.store")

SAFE_POLICY = "noeviction"


async def eviction_problems(client: AsyncClient) -> list[str]:
    """One line per server (each primary of a cluster) whose maxmemory-policy is not noeviction, naming
    the server and the policy. A server whose INFO fails or lacks the field reports nothing: whether it
    answers at all is another check's business."""
    if isinstance(client, RedisCluster):
        try:
            await client.initialize()  # its primaries known (a no-op once they are)
        except (*UNAVAILABLE, RedisError):
            return []
        # One call per primary: with several target nodes redis-py answers a dict per node, with one the bare
        # reply (see api/operator_routes.py library_loaded).
        servers = [(node.name, client.info("memory", target_nodes=node)) for node in client.get_primaries()]
    else:
        servers = [(_server_name(client), client.info("memory"))]
    replies = await asyncio.gather(*(info for _, info in servers), return_exceptions=True)
    problems = []
    for (name, _), reply in zip(servers, replies, strict=True):
        if isinstance(reply, (*UNAVAILABLE, RedisError)) or not isinstance(reply, dict):
            continue
        policy = reply.get("maxmemory_policy")
        if policy is not None and str(policy) != SAFE_POLICY:
            problems.append(f"Redis at {name} has maxmemory-policy {policy}: it may evict keys, so accepted "
                            f"requests may be lost (set maxmemory-policy {SAFE_POLICY})")
    return problems


def log_eviction_problems(url: str, *, cluster: bool, timeout: float = CONNECT_TIMEOUT) -> list[str]:
    """At a process's start, before its event loop: log an ERROR per evicting server, and return the lines.
    Bounded by `timeout`; a store that does not answer in time is reported by the process's own calls."""
    async def ask() -> list[str]:
        client: Any = async_client(url, cluster=cluster)
        try:
            return await asyncio.wait_for(eviction_problems(client), timeout)
        except (TimeoutError, *UNAVAILABLE, RedisError):
            return []
        finally:
            await client.aclose()

    problems = asyncio.run(ask())
    for line in problems:
        log.error("%s", line)
    return problems


def _server_name(client: Any) -> str:
    """host:port (or the socket path) of a one-server client, for the messages."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
