"""A tokens/s quota's removal is one step: its field, its bucket and its bucket's new generation (qs tgen) change
together (scheduler/admin.py set_quota, scheduler/lua/set_quota.lua). Sent as separate commands, another client
could act between them: an operator setting the quota again and a run ending there, with the field gone and the
generation not yet bumped, refunded a run of the removed bucket into the new one (quotas.lua quota_refund), a
free refill. Nothing promises a pipeline's commands reach the server in one read, so the test makes them reach
it one at a time: the admin's connection goes through a proxy that forwards one command, waits for its answer,
and runs the other clients' steps as soon as the removal shows. The proxy stands in front of one server (a
cluster's clients find its nodes' own addresses): the cluster pass sees the change arrive as one call."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions import keys
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness

RATE = {"tokens_per_second": 1, "burst_tokens": 1000}  # 1 token/s: the pinned clock refills nothing anyway


class _Stream:
    """One side of a connection, read a whole RESP2 value at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        self.buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        taken, self.buffer = self.buffer[:n], self.buffer[n:]
        return taken

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        return self._take(self.buffer.index(b"\r\n") + 2)

    def value(self) -> tuple[bytes, list[bytes]]:
        """The raw bytes of the next value, and its bulk strings (a command's name and arguments)."""
        line = self._line()
        if line[:1] == b"$" and int(line[1:-2]) >= 0:
            body = self._take(int(line[1:-2]) + 2)
            return line + body, [body[:-2]]
        if line[:1] == b"*" and int(line[1:-2]) > 0:
            raw, items = line, []
            for _ in range(int(line[1:-2])):
                more, strings = self.value()
                raw += more
                items += strings
            return raw, items
        return line, []


class OneCommandAtATime:
    """A proxy that hands the server a client's commands one by one: each forwarded once the one before it
    is answered, after `before(command)` has run (on the proxy's thread, while the client waits)."""

    def __init__(self, target_port: int, before: Callable[[list[bytes]], None]) -> None:
        self.target = ("127.0.0.1", target_port)
        self.before = before
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with closing(client), closing(socket.create_connection(self.target)) as server:
            commands, answers = _Stream(client), _Stream(server)
            try:
                while True:
                    raw, command = commands.value()
                    self.before(command)
                    server.sendall(raw)
                    client.sendall(answers.value()[0])
            except ConnectionError:
                return
            except BaseException as error:  # noqa: BLE001 (shown by the test, not lost in a thread)
                self.errors.append(error)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def harness(r: redis.Redis) -> Iterator[Harness]:
    yield Harness(r)


@pytest.mark.single_server
def test_a_run_ending_beside_a_removal_refunds_nothing_into_the_quota_set_again(r: redis.Redis,
                                                                                  harness: Harness) -> None:
    h, cfg, qs = harness, keys.group_key("default", "cfg"), keys.group_key("default", "qs")
    h.set_quota("default", **RATE)
    h.add_worker("w", slots=10)
    old = h.submit("o", tenant="t", max_tokens=1000)  # reserves the whole bucket, generation 0
    assert h.status(old) == "running"
    seen: dict[str, Any] = {}

    def others(command: list[bytes]) -> None:
        """Once the removal shows (its field gone): another operator sets the quota again, a request takes
        900 of it, and the old run ends with 990 unused, reserved from the removed bucket."""
        if "tgen" in seen or r.hexists(cfg, "tokens_per_second"):
            return
        seen["tgen"] = r.hget(qs, "tgen")  # the generation the others' steps met
        seen["before"] = command[0].decode().upper()
        h.set_quota("default", **RATE)
        seen["new"] = h.submit("n1", tenant="t", max_tokens=900)
        h.stop_after(old, 10)
        h.sweep()

    proxy = OneCommandAtATime(r.connection_pool.connection_kwargs["port"], others)

    async def remove() -> None:
        client = AsyncRedis(host="127.0.0.1", port=proxy.port)
        try:
            await Tuning(client).set_quota("default", {"tokens_per_second": None})
        finally:
            await client.aclose(close_connection_pool=True)

    try:
        asyncio.run(remove())
    finally:
        proxy.close()
    assert not proxy.errors
    assert "tgen" in seen  # the removal showed before the admin's call returned
    later = h.submit("n2", tenant="t", max_tokens=900)
    h.sweep()
    # The others met the removal whole (the new generation), so the old run's 990 went nowhere: the new bucket
    # holds the 100 tokens the first request left. Before, they met it half made (the field gone, generation 0,
    # before the bucket's HDEL): the refund filled the new bucket, and a second 900 ran beside the first.
    assert (seen["tgen"], h.status(seen["new"]), h.status(later)) == ("1", "running", "queued")


def test_a_quota_change_reaches_the_server_as_one_call(r: Any, harness: Harness) -> None:
    """On one server and on the group's master of a cluster: the change arrives as one function call, with no
    write of its own beside it (what another client could land between)."""
    h, end = harness, keys.group_key("default", "quota-test-end")  # the group's slot: its master's MONITOR
    h.set_quota("default", **RATE)
    port = r.get_node_from_key(end).port if ON_CLUSTER else r.connection_pool.connection_kwargs["port"]
    watcher = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    with closing(watcher):
        with watcher.monitor() as monitor:
            h.set_quota("default", tokens_per_second=None, requests_per_second=5)
            watcher.set(end, 1)
            commands = []
            while "quota-test-end" not in (seen := monitor.next_command())["command"]:
                if seen["client_type"] != "lua":  # a function's own commands: inside its one step
                    commands.append(seen["command"].split()[0].strip('"').upper())
        watcher.delete(end)
    writes = [c for c in commands if c in {"HSET", "HDEL", "HINCRBY", "RPUSH", "LTRIM"}]
    assert (commands.count("FCALL"), writes) == (1, [])
