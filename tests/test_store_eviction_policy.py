"""A store that may evict keys (maxmemory-policy other than noeviction) loses accepted requests after their
202: /readyz fails naming the policy, and the API, scheduler and worker log an ERROR at start, but run
(sessions/store_policy.py). Real Valkey: CONFIG SET on every node of the test store, restored after."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.embedded import free_port
from sluicegate.sessions.store_policy import eviction_problems
from tests.helpers import ROOT, Stack, call, fast_settings, stop_process, with_redis


def _nodes(r: redis.Redis) -> list[dict[str, object]]:
    """execute_command's targets: every node of the cluster (replicas too), or the one server."""
    return [{"target_nodes": node} for node in r.get_nodes()] if isinstance(r, RedisCluster) else [{}]


def primary_addresses(r: redis.Redis) -> list[str]:
    if isinstance(r, RedisCluster):
        return [node.name for node in r.get_primaries()]
    kwargs = r.connection_pool.connection_kwargs
    return [f"{kwargs['host']}:{kwargs['port']}"]


@contextmanager
def evicting(r: redis.Redis, policy: str) -> Iterator[None]:
    """The test store under `policy` on every node, each put back as it was whatever happens (the store is
    shared by the session's tests)."""
    before = []
    try:
        for target in _nodes(r):
            before.append((target, r.config_get("maxmemory-policy", **target)))
            r.execute_command("CONFIG", "SET", "maxmemory-policy", policy, **target)
        yield
    finally:
        for target, reply in before:
            r.execute_command("CONFIG", "SET", "maxmemory-policy", reply["maxmemory-policy"], **target)


def problems_of(redis_url: str) -> list[str]:
    return with_redis(redis_url, eviction_problems)


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_eviction_problems_names_each_evicting_server_and_its_policy(redis_url: str, r: redis.Redis,
                                                                     policy: str) -> None:
    assert problems_of(redis_url) == []  # the test store: noeviction
    with evicting(r, policy):
        problems = problems_of(redis_url)
    addresses = primary_addresses(r)
    assert len(problems) == len(addresses), problems  # one line per primary
    for address in addresses:
        line = next((p for p in problems if f"Redis at {address} " in p), None)
        assert line is not None, (address, problems)
        assert f"maxmemory-policy {policy}" in line and "set maxmemory-policy noeviction" in line, line
    assert problems_of(redis_url) == []


def test_eviction_problems_reports_nothing_for_a_server_that_does_not_answer() -> None:
    """Whether the store answers is /readyz's ping's business: no problem invented here."""
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    assert problems_of(url) == []


def test_readyz_fails_while_the_store_may_evict_and_passes_once_fixed(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url)).start(workers=0, scheduler=False)
    try:
        assert call("GET", f"{stack.base_url}/readyz") == (200, {"status": "ready"})
        with evicting(r, "allkeys-lru"):
            code, reply = call("GET", f"{stack.base_url}/readyz")
            assert code == 503 and reply["status"] == "unavailable", reply  # old: 200 ready
            assert "maxmemory-policy allkeys-lru" in reply["reason"], reply
            for address in primary_addresses(r):
                assert address in reply["reason"], (address, reply)
        # fixed at runtime: ready again with no restart
        assert call("GET", f"{stack.base_url}/readyz") == (200, {"status": "ready"})
    finally:
        stack.stop()


def _stderr_until(proc: subprocess.Popen[bytes], needle: str, timeout: float) -> str:
    """The process's stderr until a line holds `needle`, the process ends, or `timeout` passes."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


@pytest.mark.parametrize("role", ["api", "scheduler", "worker"])
def test_a_process_on_an_evicting_store_logs_an_error_at_start_and_runs(redis_url: str, r: redis.Redis,
                                                                       role: str) -> None:
    settings = fast_settings(redis_url, engine="sim", port=free_port())
    with evicting(r, "volatile-lru"):
        proc = subprocess.Popen([sys.executable, "-m", "sluicegate", role], env={**os.environ, **settings.to_env()},
                                cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            err = _stderr_until(proc, "set maxmemory-policy noeviction", timeout=30)
            errors = [line for line in err.splitlines() if " ERROR sluicegate.store: " in line]
            assert errors, err  # old: no word of the policy
            assert all("maxmemory-policy volatile-lru" in line for line in errors), errors
            time.sleep(0.5)
            assert proc.poll() is None, err  # it does not refuse to run
        finally:
            stop_process(proc)
