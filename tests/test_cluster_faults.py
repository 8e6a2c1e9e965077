"""A master of the cluster goes down under a running stack: the API answers a clear 503 (never a
hang, never a 500), a process started meanwhile says so in one line and exits non-zero, and once the
node is back the stack serves again with nothing lost."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate.embedded import EmbeddedCluster
from tests.cluster_helpers import start_test_cluster
from tests.helpers import Stack, call, fast_settings, sse, submit, wait_for

pytestmark = pytest.mark.own_servers  # a cluster of its own: it kills one of its nodes


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    running = start_test_cluster(tmp_path)
    yield running
    running.stop()


def test_a_master_down_is_a_503_then_the_stack_recovers(cluster: EmbeddedCluster) -> None:
    stack = Stack(fast_settings(cluster.url, redis_cluster=True)).start(workers=1)
    try:
        base = stack.base_url
        before = submit(base, "before", max_tokens=5)
        assert [e.event for e in sse(base, f"/v1/requests/{before}/events", timeout=20)][-1] == "done"
        cluster.kill_node(2)
        time.sleep(2.5)  # past the node timeout: the cluster reports state fail

        started = time.monotonic()
        codes = [call("POST", f"{base}/v1/sessions/down-{i}/requests", {"prompt": "p", "max_tokens": 2})
                 for i in range(6)]
        assert time.monotonic() - started < 60, "the API hung on a cluster with a master down"
        # A session whose slots live on a master still up may be served until the cluster marks the
        # node failed (Valkey refuses everything once its state is fail): 202 or 503, nothing else.
        assert {code for code, _ in codes} <= {202, 503} and 503 in {code for code, _ in codes}, codes
        assert all(reply["error"]["type"] == "unavailable" for code, reply in codes if code == 503)
        accepted = [reply["request_id"] for code, reply in codes if code == 202]

        down = subprocess.run([sys.executable, "-m", "sluicegate", "api", "--redis-url", cluster.url,
                               "--redis-cluster"], capture_output=True, text=True, timeout=30)
        assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1, down.stderr
        assert "fail" in down.stderr or "cannot" in down.stderr, down.stderr

        cluster.start_node(2)
        cluster.wait_ok()
        wait_for(lambda: call("POST", f"{base}/v1/sessions/back/requests", {"prompt": "p", "max_tokens": 3})[0] == 202,
                 timeout=60, interval=1.0, what="the API to accept work again")
        for rid in accepted:  # accepted means durable: each runs once the cluster is whole again
            assert [e.event for e in sse(base, f"/v1/requests/{rid}/events", timeout=30)][-1] == "done"
        after = submit(base, "after", max_tokens=4)
        events = list(sse(base, f"/v1/requests/{after}/events", timeout=30))
        assert events[-1].event == "done" and [e.data["index"] for e in events if e.event == "token"] == [0, 1, 2, 3]
    finally:
        stack.stop()


def test_a_single_server_named_as_a_cluster_is_one_line_and_exit_1(redis_url: str) -> None:
    """--redis-cluster against a server that is not in cluster mode: say what to change, at once."""
    proc = subprocess.run([sys.executable, "-m", "sluicegate", "scheduler", "--redis-url", redis_url,
                           "--redis-cluster"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
