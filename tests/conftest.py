"""Fixtures: one real Valkey server per test session (the embedded binary) on a free port, flushed
before each test; an in-process stack on top of it.

`SLUICEGATE_TEST_CLUSTER=1` runs the same suite on an embedded 3-master Valkey cluster instead
(`redis_url` is then its seed URL, `r` a cluster client, and `fast_settings` turns `--redis-cluster`
on). Tests marked `single_server` prove something about one server only (a server crash, the
deterministic harness whose clock is pinned through a global key) and are skipped there; tests marked
`own_servers` start servers of their own and run in the single-server pass only.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from sluicegate.embedded import EmbeddedCluster, EmbeddedServer
from tests.cluster_helpers import flush_cluster, rc, start_test_cluster, valkey_cluster  # noqa: F401 (fixtures)
from tests.helpers import ON_CLUSTER, Stack, fast_settings


def pytest_configure(config: pytest.Config) -> None:
    # Run as a background job (`cmd &` in a script), the suite inherits SIGINT ignored, and so would the
    # commands it starts: the tests that Ctrl-C them (`tail`, `stats --watch`) would wait for ever. A handler
    # of ours is reset to the default in each child at exec, where Python turns it into KeyboardInterrupt.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "single_server: proves a property of one server; skipped on a cluster")
    config.addinivalue_line("markers", "own_servers: starts its own servers; runs in the single-server pass only")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not ON_CLUSTER:
        return
    skip = pytest.mark.skip(reason="single-server only (see tests/conftest.py)")
    for item in items:
        if "single_server" in item.keywords or "own_servers" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer | EmbeddedCluster]:
    # SLUICEGATE_TEST_SERVER=/usr/bin/redis-server runs the suite against another server binary.
    if ON_CLUSTER:
        cluster = start_test_cluster(tmp_path_factory.mktemp("valkey-cluster"))
        yield cluster
        cluster.stop()
        return
    server = EmbeddedServer(data_dir=str(tmp_path_factory.mktemp("valkey")), persistent=False,
                            binary=os.environ.get("SLUICEGATE_TEST_SERVER") or None).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(valkey_server: EmbeddedServer | EmbeddedCluster) -> str:
    if isinstance(valkey_server, EmbeddedCluster):
        flush_cluster(valkey_server)
        return valkey_server.url
    client = redis.Redis.from_url(valkey_server.url)
    client.flushall()
    client.close()
    return valkey_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = (RedisCluster.from_url(redis_url, decode_responses=True) if ON_CLUSTER
              else redis.Redis.from_url(redis_url, decode_responses=True))
    yield client  # type: ignore[misc]
    client.close()


@pytest.fixture
def stack(redis_url: str) -> Iterator[Stack]:
    """API + scheduler + one 4-slot sim worker (400 tokens/s, no prefill)."""
    running = Stack(fast_settings(redis_url)).start(workers=1)
    yield running
    running.stop()


@pytest.fixture
def auth_stack(redis_url: str) -> Iterator[Stack]:
    """The stack with auth on and the admin key `admin-secret` (one sim worker)."""
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=1)
    yield running
    running.stop()


@pytest.fixture
def short(redis_url: str) -> Iterator[Stack]:
    """The usual stack with sessions that expire 1 s after their last event."""
    running = Stack(fast_settings(redis_url, session_ttl=1)).start(workers=1)
    yield running
    running.stop()


@pytest.fixture
def idle_auth_stack(redis_url: str) -> Iterator[Stack]:
    """Auth on, the admin key `admin-secret`, and no worker: what is submitted stays queued."""
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=0)
    yield running
    running.stop()


@pytest.fixture
def no_sluicegate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SLUICEGATE_* variable of the developer's shell leaks into a test of settings (`pytestmark =
    pytest.mark.usefixtures("no_sluicegate_env")` in the modules that read them)."""
    for name in list(os.environ):
        if name.startswith("SLUICEGATE_"):
            monkeypatch.delenv(name)
