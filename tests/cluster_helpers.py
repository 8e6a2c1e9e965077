"""A real 3-master Valkey Cluster for tests: the embedded binary, free ports, no persistence.

Forming takes ~2 s (Valkey keeps a new master out of cluster_state:ok for its first 2 s), so start it
once per session or module and empty it between tests with flush_cluster(). tests/conftest.py offers
its fixtures to every test: `valkey_cluster` (session-scoped) and `rc`, a client on it emptied first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster

from sluicegate.embedded import EmbeddedCluster
from sluicegate.sessions.connect import sync_client


def start_test_cluster(tmp_dir: str | Path, masters: int = 3) -> EmbeddedCluster:
    """A formed cluster of `masters` masters on free ports under tmp_dir, AOF off (tests do not
    restart it); SLUICEGATE_TEST_SERVER picks another server binary, as for the single server."""
    return EmbeddedCluster(data_dir=str(tmp_dir), masters=masters, persistent=False,
                           binary=os.environ.get("SLUICEGATE_TEST_SERVER") or None).start()


def flush_cluster(cluster: EmbeddedCluster) -> None:
    """Empty every master (keys and functions), as the single-server fixture's FLUSHALL does."""
    client = sync_client(cluster.url, cluster=True)
    try:
        client.flushall()
        client.function_flush()
    finally:
        client.close()


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    cluster = start_test_cluster(tmp_path_factory.mktemp("valkey-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def rc(valkey_cluster: EmbeddedCluster) -> Iterator[RedisCluster]:
    """A client on the test cluster, emptied first (tests that play the protocol on a cluster of their own)."""
    flush_cluster(valkey_cluster)
    client = RedisCluster.from_url(valkey_cluster.url, decode_responses=True)
    yield client
    client.close()
