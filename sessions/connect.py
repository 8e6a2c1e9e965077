"""The one place where Redis clients are built, for one server or a Redis Cluster.

Every process takes `--redis-url` plus `--redis-cluster`; building clients here keeps the choice of
client class, the timeouts, and the cluster routing rules in one file instead of in each caller.

Routing, as read in redis-py 6.4 (redis/cluster.py, redis/asyncio/cluster.py, redis/_parsers/commands.py):
- FCALL / FCALL_RO *are* routed by their KEYS, but not cheaply: FCALL is a `movablekeys` command, so
  both cluster clients ask a server `COMMAND GETKEYS FCALL ...` before every call (the sync client
  asks its default node, the asyncio one the node it initialized from), then send the FCALL to the
  owner of the keys' slot; keys in several slots raise RedisClusterException; zero keys go to a
  random slot's node. Pipelines do the same per command. To save that extra round trip, route it
  yourself: `client.execute_command("FCALL", name, n, *keys, *args, target_nodes=node_for_key(client,
  keys[0]))`. With target_nodes the client does not retry connection errors (it still follows MOVED
  and ASK), so the caller retries.
- FUNCTION LOAD / DELETE / FLUSH / LIST go to every primary the client knows (sync: one after the
  other; asyncio: in parallel) and return `{node_name: reply}`; one failing node fails the call
  after the others may have loaded it. Functions are not replicated between shards, and a primary
  that appears later (failover, resharding) has none: reload on "Function not found", node by node
  where it is missing (sessions/scripts.py: never with REPLACE, which would restart the library).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, Literal, overload
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS
from redis.crc import key_slot as _key_slot
from redis.retry import Retry

from sluicegate.sessions.resp import NotConnected

CONNECT_TIMEOUT = 5.0  # a server that does not accept a connection in 5 s is down, not slow
READ_TIMEOUT = 15.0  # above any single command we send (scripts are short); blocking reads pass their own

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


# What "the store cannot answer right now" looks like, on one server or a cluster (a node down, its
# slots uncovered, a failover under way): callers answer 503 or retry, never 500.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException, redis.exceptions.TryAgainError)


# The store refusing work for a while (full under noeviction, a replica, a failed snapshot, a long
# script, a failover): the API answers 503, a worker or scheduler retries, as for a lost connection.
# redis-py names some by class and leaves the others as a ResponseError whose message starts with the
# server's error code. A refused call did nothing (the server refuses before it runs a command).
REFUSING: tuple[type[BaseException], ...] = (
    redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError)
REFUSING_CODES = ("MISCONF ", "BUSY ", "NOREPLICAS ", "CLUSTERDOWN ", "OOM ", "READONLY ", "LOADING ")


def store_refuses(exc: BaseException) -> bool:
    return isinstance(exc, REFUSING) or (isinstance(exc, redis.exceptions.ResponseError)
                                         and str(exc).startswith(REFUSING_CODES))


def store_unavailable(exc: BaseException) -> bool:
    """Unreachable or refusing work for now: worth retrying, never a caller's mistake."""
    return isinstance(exc, UNAVAILABLE) or store_refuses(exc)


def never_sent(exc: BaseException) -> bool:
    """A failure to connect, so the command never went out and cannot have run: the lean client's
    NotConnected (exact), or redis-py's words for a connection it could not make ("Error 111 connecting
    to ...", "Timeout connecting to server"): its own retries may hide an earlier attempt that went out."""
    if isinstance(exc, NotConnected):
        return True
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError) and \
        "connecting to" in str(exc)


class RedisUnavailable(RuntimeError):
    """Redis cannot be used as configured; the message is one line that says what to change."""


def tcp_keepalive(url: str) -> dict[str, Any]:
    """redis-py's socket_keepalive for a TCP URL; its Unix socket connections refuse the argument (and a
    local socket's peer cannot vanish unseen, as a host behind a dead network can)."""
    return {} if url.startswith("unix:") else {"socket_keepalive": True}


def _with_timeouts(kw: dict[str, Any]) -> dict[str, Any]:
    return {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": READ_TIMEOUT, **kw}


@overload
def sync_client(url: str, *, cluster: Literal[False], **kw: Any) -> redis.Redis: ...
@overload
def sync_client(url: str, *, cluster: Literal[True], **kw: Any) -> redis.cluster.RedisCluster: ...
@overload
def sync_client(url: str, *, cluster: bool, **kw: Any) -> SyncClient: ...
def sync_client(url: str, *, cluster: bool, **kw: Any) -> SyncClient:
    """A blocking client; with cluster=True `url` names any node and the client finds the rest."""
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **_with_timeouts(kw))
    return redis.Redis.from_url(url, **_with_timeouts(kw))


@overload
def async_client(url: str, *, cluster: Literal[False], **kw: Any) -> redis.asyncio.Redis: ...
@overload
def async_client(url: str, *, cluster: Literal[True], **kw: Any) -> redis.asyncio.cluster.RedisCluster: ...
@overload
def async_client(url: str, *, cluster: bool, **kw: Any) -> AsyncClient: ...
def async_client(url: str, *, cluster: bool, **kw: Any) -> AsyncClient:
    """An asyncio client; the cluster one connects lazily, on its first command."""
    if cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(url, **_with_timeouts(kw))
    return redis.asyncio.Redis.from_url(url, **_with_timeouts(kw))


def key_slot(key: str | bytes) -> int:
    """The cluster hash slot (0..16383) of a key, honouring {hash tags}: redis-py's own function,
    which takes bytes only; str is encoded as UTF-8, as redis-py's default encoder does."""
    return _key_slot(key.encode() if isinstance(key, str) else key)


def node_for_key(client: redis.cluster.RedisCluster, key: str | bytes) -> redis.cluster.ClusterNode:
    """The primary that owns `key`'s slot in the client's slot cache: pass it as `target_nodes` to
    send an FCALL there without redis-py's COMMAND GETKEYS round trip (see the module docstring)."""
    return client.get_node_from_key(key)


async def async_node_for_key(client: redis.asyncio.cluster.RedisCluster,
                             key: str | bytes) -> redis.asyncio.cluster.ClusterNode:
    """node_for_key for the asyncio client, which has no slot cache until it has initialized (and
    drops it after a connection error): initialize() is a no-op when the cache is there."""
    await client.initialize()
    return client.get_node_from_key(key)


def primary_urls(url: str, *, cluster: bool, timeout: float = CONNECT_TIMEOUT) -> list[str]:
    """Every primary that serves slots, as URLs with the seed's scheme, credentials, db and query,
    ordered by their first slot; one server is just `[url]`. For per-node work: loading functions,
    counting keys, raw connections."""
    if not cluster:
        return [url]
    with _probe_client(url, timeout) as seed:
        slots = seed.execute_command("CLUSTER", "SLOTS")
    seed_host = urlsplit(url).hostname or "127.0.0.1"
    addresses: dict[tuple[str, int], int] = {}
    for first, _last, primary, *_replicas in sorted(slots, key=lambda entry: int(entry[0])):
        host, port = text(primary[0]), int(primary[1])
        # "" or "?" means the node does not know its own endpoint: it is the host we asked.
        addresses.setdefault((host if host not in ("", "?") else seed_host, port), int(first))
    return [_with_address(url, host, port) for host, port in addresses]


def check_redis(url: str, *, cluster: bool, timeout: float = 5.0) -> None:
    """Fail fast, before a process starts its loops, with one line that says what is wrong: the URL,
    the network, the password, cluster mode on the wrong side, or a cluster that cannot serve every
    slot. Returns None when Redis is usable as configured. Bounded by `timeout` in all: the probe
    runs in a daemon thread whose sockets time out too, so a black-holed host cannot hang us."""
    outcome: list[BaseException | None] = []
    probe = threading.Thread(target=lambda: outcome.append(_try(_check, url, cluster, timeout)),
                             name="check-redis", daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome:
        raise RedisUnavailable(f"Redis at {_where(url)} did not answer within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


# -- internals -------------------------------------------------------------------------------------


def _try(check: Callable[..., None], *args: Any) -> BaseException | None:
    try:
        check(*args)
    except BaseException as error:  # handed to the caller's thread
        return error
    return None


def _check(url: str, cluster: bool, timeout: float) -> None:
    where = _where(url)
    try:
        client = _probe_client(url, timeout)
    except ValueError as error:
        raise RedisUnavailable(f"bad Redis URL {redacted(url)!r}: {error}") from None
    with client:
        info = _ask(client, where, timeout, "INFO", "cluster")
        enabled = info.get("cluster_enabled") == "1"
        if cluster and not enabled:
            raise RedisUnavailable(f"Redis at {where} is not in cluster mode (cluster_enabled:0): drop "
                                   "--redis-cluster, or point --redis-url at a node of a Redis Cluster")
        if enabled and not cluster:
            raise RedisUnavailable(f"Redis at {where} is a Redis Cluster node: add --redis-cluster "
                                   "(env SLUICEGATE_REDIS_CLUSTER=1)")
        if not cluster:
            return
        state = _ask(client, where, timeout, "CLUSTER", "INFO")
        uncovered = REDIS_CLUSTER_HASH_SLOTS - int(state.get("cluster_slots_assigned", 0))
        if uncovered:
            raise RedisUnavailable(f"the Redis Cluster at {where} has {uncovered} of {REDIS_CLUSTER_HASH_SLOTS} "
                                   "slots uncovered: assign them (valkey-cli --cluster fix) or wait until it "
                                   "is formed")
        if state.get("cluster_state") != "ok":
            failed = _failed_nodes(_call(client, where, timeout, "CLUSTER", "NODES"))
            raise RedisUnavailable(
                f"the Redis Cluster at {where} is in state {state.get('cluster_state')}: "
                f"{REDIS_CLUSTER_HASH_SLOTS - int(state.get('cluster_slots_ok', 0))} slots not ok"
                + (f", node(s) {', '.join(failed)} failing" if failed else "")
                + "; bring the failed masters back or wait for a failover")
    # The cluster may announce addresses this host cannot reach (NAT, containers): try each.
    try:
        node_urls = primary_urls(url, cluster=True, timeout=timeout)
    except redis.RedisError as error:
        raise RedisUnavailable(f"Redis at {where} answered CLUSTER SLOTS with an error: {_reason(error)}") from None
    for node_url in node_urls:
        with _probe_client(node_url, timeout) as node:
            try:
                node.ping()
            except redis.RedisError as error:
                raise RedisUnavailable(f"the Redis Cluster at {where} announces the node {_where(node_url)}, "
                                       f"which cannot be used from here: {_reason(error)}") from None


def _probe_client(url: str, timeout: float) -> redis.Redis:
    """A plain client for one node that fails at once: no retries, every socket step bounded."""
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                retry=Retry(NoBackoff(), 0), decode_responses=True)


def _call(client: redis.Redis, where: str, timeout: float, *command: Any) -> Any:
    """One command; any failure becomes a one-line RedisUnavailable."""
    try:
        return client.execute_command(*command)
    except redis.AuthenticationError as error:
        reason = _reason(error)
        if "without any password configured" in reason or "no password is set" in reason:
            raise RedisUnavailable(f"Redis at {where} has no password, but --redis-url carries one: "
                                   "remove it from the URL") from None
        if "required" in reason.lower():
            raise RedisUnavailable(f"Redis at {where} requires a password: put it in --redis-url "
                                   "(redis://:PASSWORD@host:port/0)") from None
        raise RedisUnavailable(f"Redis at {where} refused the credentials: {reason} "
                               "(check the password in --redis-url)") from None
    except redis.TimeoutError:
        raise RedisUnavailable(f"Redis at {where} did not answer within {timeout:g} s") from None
    except redis.ConnectionError as error:
        raise RedisUnavailable(f"cannot connect to Redis at {where}: {_reason(error)}") from None
    except redis.exceptions.InvalidResponse as error:
        raise RedisUnavailable(f"what listens at {where} does not speak Redis: {_reason(error)}") from None
    except redis.RedisError as error:
        raise RedisUnavailable(f"Redis at {where} answered {command[0]} with an error: {_reason(error)}") from None


def _ask(client: redis.Redis, where: str, timeout: float, *command: Any) -> dict[str, str]:
    """An INFO-style command as {field: text}, whether redis-py parsed it (INFO) or not (CLUSTER INFO)."""
    reply = _call(client, where, timeout, *command)
    if isinstance(reply, dict):
        return {str(name): str(value) for name, value in reply.items()}
    fields = (line.split(":", 1) for line in text(reply).splitlines() if ":" in line and not line.startswith("#"))
    return {name: value.strip() for name, value in fields}


def _failed_nodes(nodes: Any) -> list[str]:
    """Addresses flagged fail or pfail in CLUSTER NODES (`<id> <ip:port@bus> <flags> ...`)."""
    failed = []
    for line in text(nodes).splitlines():
        parts = line.split()
        if len(parts) > 2 and {"fail", "fail?"} & set(parts[2].split(",")):
            failed.append(parts[1].split("@")[0])
    return failed


def _reason(error: BaseException) -> str:
    """The error's text on one line, without redis-py's "Error 111 connecting to h:p." preamble."""
    text = " ".join(str(error).split())
    return re.sub(r"^Error -?\d+ connecting to \S+?\. ", "", text) or type(error).__name__


def text(value: Any) -> str:
    """A reply as text (clients built without decode_responses answer bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _where(url: str) -> str:
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else redacted(url)
    except ValueError:
        return redacted(url)


def redacted(url: str) -> str:
    """The URL with any password masked (in its user part, or a unix:// URL's `?password=`): messages end up
    in logs."""
    url = re.sub(r"([?&])password=[^&#]*", r"\1password=***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}"))


def _with_address(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{address}" if userinfo else address))
