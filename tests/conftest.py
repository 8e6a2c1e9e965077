"""Fixtures: one real Valkey server per test session (the embedded binary) on a free port, flushed
before each test; an in-process stack on top of it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from sluicegate.embedded import EmbeddedServer
from tests.helpers import Stack, fast_settings


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    # SLUICEGATE_TEST_SERVER=/usr/bin/redis-server runs the suite against another server binary.
    server = EmbeddedServer(data_dir=str(tmp_path_factory.mktemp("valkey")), persistent=False,
                            binary=os.environ.get("SLUICEGATE_TEST_SERVER") or None).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(valkey_server: EmbeddedServer) -> str:
    client = redis.Redis.from_url(valkey_server.url)
    client.flushall()
    client.close()
    return valkey_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def stack(redis_url: str) -> Iterator[Stack]:
    """API + scheduler + one 4-slot sim worker (400 tokens/s, no prefill)."""
    running = Stack(fast_settings(redis_url)).start(workers=1)
    yield running
    running.stop()
