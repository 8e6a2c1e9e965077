"""`/readyz` on a Redis Cluster of one primary (a one-shard cluster-mode deployment): redis-py answers a
call to the PRIMARIES as a dict of replies only when there are several, so the check asks each primary
itself (api/operator_routes.py `library_loaded`). Real Valkey Cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluicegate.sessions.connect import sync_client
from tests.cluster_helpers import start_test_cluster
from tests.helpers import Stack, call, fast_settings
from tests.test_readyz import flush_functions, library_on_every_master


@pytest.mark.own_servers
def test_ready_on_a_cluster_of_one_primary(tmp_path: Path) -> None:
    cluster = start_test_cluster(tmp_path, masters=1)
    stack = Stack(fast_settings(cluster.url, redis_cluster=True)).start(workers=0, scheduler=False)
    client = sync_client(cluster.url, cluster=True, decode_responses=True)
    try:
        assert call("GET", f"{stack.base_url}/readyz") == (200, {"status": "ready"})
        flush_functions(client)  # a flushed or failed-over server: /readyz loads the library again
        assert not library_on_every_master(client)
        assert call("GET", f"{stack.base_url}/readyz") == (200, {"status": "ready"})
        assert library_on_every_master(client)
    finally:
        client.close()
        stack.stop()
        cluster.stop()
