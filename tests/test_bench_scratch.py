"""A bench's scratch Valkey (loadtest/common.py `scratch_server`) takes its data dir with it when it stops, so
that benches and the tests that run them leave nothing in /tmp."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from sluicegate.loadtest.common import scratch_server


@pytest.mark.single_server  # a scratch server of its own
def test_a_scratch_server_removes_its_data_dir_when_it_stops() -> None:
    server = scratch_server(persistent=True)
    data_dir = Path(server.data_dir)
    with redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
        client.execute_command("BGREWRITEAOF")
    assert data_dir.is_dir() and any(data_dir.iterdir())
    server.stop()
    assert not data_dir.exists()
    server.stop()  # a second stop finds nothing to do
