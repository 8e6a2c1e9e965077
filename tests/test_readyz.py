"""`/readyz`: ready when Redis answers and the function library is loaded (503 with the reason
otherwise); `/healthz` stays liveness. Real Valkey."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.embedded import EmbeddedServer
from sluicegate.sessions.library import digest
from tests.helpers import Stack, call, fast_settings


def library_on_every_master(r: redis.Redis) -> bool:
    name = f"sluicegate_{digest()}"
    if isinstance(r, RedisCluster):
        return all(r.execute_command("FUNCTION", "LIST", "LIBRARYNAME", name, target_nodes=node)
                   for node in r.get_primaries())
    return bool(r.execute_command("FUNCTION", "LIST", "LIBRARYNAME", name))


def flush_functions(r: redis.Redis) -> None:
    if isinstance(r, RedisCluster):
        for node in r.get_primaries():
            r.execute_command("FUNCTION", "FLUSH", target_nodes=node)
    else:
        r.execute_command("FUNCTION", "FLUSH")


def test_ready_when_redis_answers_and_a_lost_library_is_loaded_again(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0, scheduler=False)
    try:
        assert call("GET", f"{stack.base_url}/readyz") == (200, {"status": "ready"})
        assert library_on_every_master(r)
        flush_functions(r)  # a flushed server, or a new master after a failover
        assert not library_on_every_master(r)
        assert call("GET", f"{stack.base_url}/readyz") == (200, {"status": "ready"})
        assert library_on_every_master(r)
        assert call("GET", f"{stack.base_url}/healthz")[0] == 200
    finally:
        stack.stop()


def test_not_ready_when_the_library_cannot_be_loaded(redis_url: str, r: redis.Redis) -> None:
    """A user that may not run FUNCTION (an ACL) on a server without the library: 503 naming it."""
    nodes = r.get_nodes() if isinstance(r, RedisCluster) else [None]
    for node in nodes:
        args = ("ACL", "SETUSER", "noload", "on", ">pw", "~*", "&*", "+@all", "-function")
        r.execute_command(*args, **({"target_nodes": node} if node else {}))
    parts = urlsplit(redis_url)
    url = urlunsplit(parts._replace(netloc=f"noload:pw@{parts.hostname}:{parts.port}"))
    stack = Stack(fast_settings(url)).start(workers=0, scheduler=False)
    try:
        flush_functions(r)
        code, reply = call("GET", f"{stack.base_url}/readyz")
        assert code == 503 and reply["status"] == "unavailable", reply
        assert reply["reason"].startswith("function library not loaded"), reply
        assert call("GET", f"{stack.base_url}/healthz")[0] == 200  # alive, just not ready
    finally:
        stack.stop()
        for node in nodes:
            r.execute_command("ACL", "DELUSER", "noload", **({"target_nodes": node} if node else {}))


@pytest.mark.own_servers
def test_not_ready_when_redis_does_not_answer(tmp_path: Path) -> None:
    server = EmbeddedServer(data_dir=str(tmp_path), persistent=False).start()
    stack = Stack(fast_settings(server.url, redis_cluster=False)).start(workers=0, scheduler=False)
    try:
        assert call("GET", f"{stack.base_url}/readyz")[0] == 200
        server.stop()
        code, reply = call("GET", f"{stack.base_url}/readyz")
        assert code == 503 and reply["reason"].startswith("redis does not answer"), reply
        assert call("GET", f"{stack.base_url}/healthz")[0] == 200  # alive: a liveness probe restarts nothing
    finally:
        stack.stop()
        server.stop()
