"""The embedded Valkey Cluster and the connection factory: real servers on free loopback ports.

One 3-master cluster serves the module; the tests that break it (slots removed, a master killed) run
last and heal it before they return."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sluicegate.embedded import CLUSTER_SLOTS, EmbeddedCluster, EmbeddedServer, RedisProcess, free_port
from sluicegate.sessions.connect import RedisUnavailable, check_redis, key_slot, node_for_key, primary_urls, sync_client
from tests.cluster_helpers import flush_cluster, start_test_cluster

pytestmark = pytest.mark.own_servers  # its own servers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    running = start_test_cluster(tmp_path_factory.mktemp("cluster"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(data_dir=str(tmp_path_factory.mktemp("single")), persistent=False).start()
    yield server
    server.stop()


def unavailable(url: str, *, cluster: bool, timeout: float = 5.0) -> str:
    with pytest.raises(RedisUnavailable) as caught:
        check_redis(url, cluster=cluster, timeout=timeout)
    message = str(caught.value)
    assert "\n" not in message
    return message


def slot_owners(cluster: EmbeddedCluster) -> dict[int, tuple[int, int]]:
    """{port: (first, last)} from CLUSTER SLOTS as node 0 sees it."""
    with cluster.client(0) as node:
        return {int(entry[2][1]): (int(entry[0]), int(entry[1])) for entry in node.execute_command("CLUSTER", "SLOTS")}


def node_id(cluster: EmbeddedCluster, index: int) -> str:
    with cluster.client(index) as node:
        return str(node.execute_command("CLUSTER", "MYID"))


def test_the_cluster_forms_with_three_masters_covering_every_slot(cluster: EmbeddedCluster) -> None:
    owners = slot_owners(cluster)
    assert sorted(owners) == cluster.ports
    assert sum(last - first + 1 for first, last in owners.values()) == CLUSTER_SLOTS
    for index in range(cluster.masters):
        info = cluster.cluster_info(index)
        assert (info["cluster_state"], info["cluster_slots_ok"], info["cluster_size"]) == ("ok", "16384", "3")
    assert cluster.formed_in is not None and cluster.formed_in < 10


def test_one_server_and_a_cluster_share_the_process_protocol(cluster: EmbeddedCluster,
                                                             single: EmbeddedServer) -> None:
    processes: list[RedisProcess] = [cluster, single]
    assert [process.cluster for process in processes] == [True, False]
    assert cluster.url == cluster.urls[0] == f"redis://127.0.0.1:{cluster.port}/0"


def test_keys_with_distinct_hash_tags_spread_over_every_master(cluster: EmbeddedCluster) -> None:
    flush_cluster(cluster)
    client = sync_client(cluster.url, cluster=True)
    try:
        pipe = client.pipeline(transaction=False)
        for session in range(3000):
            pipe.set(f"sg:{{s{session}}}:request", b"x")
        pipe.execute()
        counts = [client.dbsize(target_nodes=client.get_node(host=cluster.host, port=port)) for port in cluster.ports]
    finally:
        client.close()
    assert sum(counts) == 3000
    assert all(0.15 <= count / 3000 <= 0.45 for count in counts), counts


def test_key_slot_follows_hash_tags_like_the_server(cluster: EmbeddedCluster) -> None:
    with cluster.client(0) as node:
        for key in ("plain", "sg:{session-7}:log", "{g:default}:ready", "é{}x"):
            assert key_slot(key) == key_slot(key.encode()) == node.execute_command("CLUSTER", "KEYSLOT", key)
    assert key_slot("a:{tag}:1") == key_slot("b:{tag}:2")


def test_primary_urls_names_the_three_masters_in_slot_order(cluster: EmbeddedCluster,
                                                           single: EmbeddedServer) -> None:
    assert primary_urls(cluster.urls[1], cluster=True) == cluster.urls
    assert primary_urls(single.url, cluster=False) == [single.url]


def test_check_redis_passes_on_a_healthy_cluster_and_a_single_server(cluster: EmbeddedCluster,
                                                                      single: EmbeddedServer) -> None:
    check_redis(cluster.urls[2], cluster=True)
    check_redis(single.url, cluster=False)


def test_check_redis_says_when_nothing_listens() -> None:
    port = free_port()
    message = unavailable(f"redis://127.0.0.1:{port}/0", cluster=False)
    assert message.startswith(f"cannot connect to Redis at 127.0.0.1:{port}")


def test_check_redis_rejects_a_bad_url_without_showing_its_password() -> None:
    message = unavailable("http://:hunter2@127.0.0.1:6379/0", cluster=True)
    assert message.startswith("bad Redis URL 'http://:***@127.0.0.1:6379/0'")
    assert "hunter2" not in message


def test_check_redis_asks_to_drop_the_cluster_flag_on_a_single_server(single: EmbeddedServer) -> None:
    message = unavailable(single.url, cluster=True)
    assert "is not in cluster mode" in message and "--redis-cluster" in message


def test_check_redis_asks_to_add_the_cluster_flag_on_a_cluster_node(cluster: EmbeddedCluster) -> None:
    assert "add --redis-cluster" in unavailable(cluster.url, cluster=False)


def test_check_redis_never_waits_longer_than_its_timeout_on_a_silent_server() -> None:
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        began = time.monotonic()
        message = unavailable(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", cluster=True, timeout=0.5)
        assert time.monotonic() - began < 1.5
    assert "did not answer within 0.5 s" in message


def test_a_cluster_restarted_on_its_data_dir_keeps_its_data_slots_and_password(tmp_path: Path) -> None:
    first = EmbeddedCluster(data_dir=str(tmp_path), password="pw:with/odd chars").start()
    try:
        client = sync_client(first.url, cluster=True)
        client.mset_nonatomic({f"{{k{index}}}": str(index) for index in range(300)})
        client.close()
        ids = [node_id(first, index) for index in range(first.masters)]
        owners = slot_owners(first)
    finally:
        first.stop()
    assert all((tmp_path / f"node-{port}" / "nodes.conf").is_file() for port in first.ports)
    assert oct((tmp_path / f"node-{first.port}" / "auth.conf").stat().st_mode & 0o777) == "0o600"

    again = EmbeddedCluster(data_dir=str(tmp_path), password=first.password).start()  # port=0: found in the dir
    try:
        assert again.port == first.port
        assert [node_id(again, index) for index in range(3)] == ids
        assert slot_owners(again) == owners
        client = sync_client(again.url, cluster=True, decode_responses=True)
        assert client.mget_nonatomic([f"{{k{index}}}" for index in range(300)]) == [str(i) for i in range(300)]
        client.close()
        check_redis(again.url, cluster=True)
        assert primary_urls(again.url, cluster=True) == again.urls
        assert again.urls[0].startswith("redis://:pw%3Awith%2Fodd%20chars@127.0.0.1:")
        assert "refused the credentials" in unavailable(again.url.replace("pw%3A", "wrong"), cluster=True)
        assert "requires a password" in unavailable(f"redis://127.0.0.1:{again.port}/0", cluster=True)
    finally:
        again.stop()


def test_run_foreground_prints_the_seed_url_and_stops_every_node_on_sigterm(tmp_path: Path) -> None:
    script = ("import sys; from sluicegate.embedded import EmbeddedCluster; "
              f"sys.exit(EmbeddedCluster(data_dir={str(tmp_path)!r}, persistent=False).run_foreground())")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
        check_redis(url, cluster=True)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert process.stdout.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "cannot connect" in unavailable(url, cluster=True)


def getkeys_calls(cluster: EmbeddedCluster) -> int:
    total = 0
    for index in range(cluster.masters):
        with cluster.client(index) as node:
            total += int(node.info("commandstats").get("cmdstat_command|getkeys", {}).get("calls", 0))
    return total


def test_fcall_routed_by_node_for_key_skips_redis_pys_getkeys_round_trip(cluster: EmbeddedCluster) -> None:
    library = ("#!lua name=probe\n"
               "redis.register_function('touch', function(keys) return redis.call('INCR', keys[1]) end)")
    keys = ["{a}:x", "{b}:x", "{c}:x", "{session-42}:log"]
    client = sync_client(cluster.url, cluster=True, decode_responses=True)
    try:
        assert sorted(client.function_load(library, replace=True)) == sorted(  # every primary, by name
            f"127.0.0.1:{port}" for port in cluster.ports)
        before = getkeys_calls(cluster)
        for key in keys:
            assert client.fcall("touch", 1, key) == 1  # redis-py's own routing: right node, one GETKEYS
        assert getkeys_calls(cluster) == before + len(keys)
        for key in keys:
            owner = node_for_key(client, key)
            assert client.execute_command("FCALL", "touch", 1, key, target_nodes=owner) == 2
            with redis.Redis(host=owner.host, port=owner.port, decode_responses=True) as node:
                assert node.get(key) == "2"
        assert getkeys_calls(cluster) == before + len(keys)
    finally:
        client.close()


# -- these break the module's cluster and heal it before returning --------------------------------


def test_check_redis_counts_uncovered_slots(cluster: EmbeddedCluster) -> None:
    flush_cluster(cluster)
    first, last = slot_owners(cluster)[cluster.ports[2]]
    for index in (2, 0, 1):  # the owner first, so that no node hears its claim again
        with cluster.client(index) as node:
            node.execute_command("CLUSTER", "DELSLOTSRANGE", first, last)
    try:
        message = unavailable(cluster.url, cluster=True)
        assert f"has {last - first + 1} of 16384 slots uncovered" in message
    finally:
        with cluster.client(2) as node:
            node.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        cluster.wait_ok(15)
    check_redis(cluster.url, cluster=True)


def test_check_redis_reports_a_cluster_whose_master_died(cluster: EmbeddedCluster) -> None:
    cluster.kill_node(2)
    try:
        deadline = time.monotonic() + 15
        message = unavailable(cluster.url, cluster=True)
        while "state fail" not in message and time.monotonic() < deadline:  # FAIL needs node timeout + gossip
            time.sleep(0.2)
            message = unavailable(cluster.url, cluster=True)
        assert "is in state fail" in message
        assert f"127.0.0.1:{cluster.ports[2]}" in message
    finally:
        cluster.start_node(2)
        cluster.wait_ok(30)
    check_redis(cluster.url, cluster=True)
