"""The lean client (sessions/resp.py) against a real server: replies matched to their callers under
concurrency and cancellation, errors, lost and half-open connections, login."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from sluicegate.embedded import EmbeddedServer, free_port
from sluicegate.sessions.connect import redacted
from sluicegate.sessions.resp import LeanRedis, RedisAddress, encode, reply_error

# The lean client speaks to one server (on a cluster the stack uses redis-py's cluster client).
pytestmark = pytest.mark.single_server


def test_concurrent_calls_each_get_their_own_reply(redis_url: str) -> None:
    async def main() -> list[object]:
        client = LeanRedis(redis_url)
        try:
            return await asyncio.gather(*(client.execute("ECHO", f"call {i}") for i in range(500)))
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [f"call {i}".encode() for i in range(500)]


def test_a_cancelled_call_leaves_the_replies_in_step(redis_url: str, r: redis.Redis) -> None:
    """The caller of a blocking pop gives up; the pop's late reply must not become the next call's."""
    async def main() -> tuple[object, object]:
        client = LeanRedis(redis_url)
        try:
            waiting = asyncio.ensure_future(client.execute("BLPOP", "nothing-yet", 0.3))
            await asyncio.sleep(0.05)
            waiting.cancel()
            r.rpush("nothing-yet", "late")  # the server answers the cancelled pop with it
            return await client.execute("ECHO", "mine"), await client.execute("LLEN", "nothing-yet")
        finally:
            await client.aclose()

    assert asyncio.run(main()) == (b"mine", 0)


def test_a_blocking_call_given_up_pops_nothing(redis_url: str, r: redis.Redis) -> None:
    """A worker's inbox pop that is cancelled (shutdown) must not take an assignment it will never
    run: the blocking client closes its connection instead, so the server stops waiting for it."""
    async def main() -> None:
        client = LeanRedis(redis_url, blocking=True)
        try:
            waiting = asyncio.ensure_future(client.execute("BRPOP", "inbox", 2))
            await asyncio.sleep(0.05)
            waiting.cancel()
            await asyncio.sleep(0.1)  # the server sees the connection close
            r.rpush("inbox", "assignment")
            assert await client.execute("BRPOP", "inbox", 1) == [b"inbox", b"assignment"]  # a fresh connection
        finally:
            await client.aclose()

    asyncio.run(main())


def test_error_replies_raise_redis_py_classes() -> None:
    """A server still loading its data (or refusing a login) is a connection error that callers
    retry or answer with 503, not a failed request."""
    loading = reply_error("LOADING Valkey is loading the dataset in memory")
    assert isinstance(loading, BusyLoadingError) and isinstance(loading, RedisConnectionError)
    assert isinstance(reply_error("NOAUTH Authentication required."), RedisConnectionError)
    other = reply_error("ERR unknown command 'X'")
    assert type(other) is ResponseError and str(other) == "ERR unknown command 'X'"


def test_a_closed_client_does_not_reconnect(redis_url: str) -> None:
    async def main() -> None:
        client = LeanRedis(redis_url)
        assert await client.execute("PING") == b"PONG"
        await client.aclose()
        with pytest.raises(RedisConnectionError, match="closed"):
            await client.execute("PING")

    asyncio.run(main())


def test_an_error_reply_raises_and_the_next_call_goes_on(redis_url: str) -> None:
    async def main() -> object:
        client = LeanRedis(redis_url)
        try:
            with pytest.raises(ResponseError, match="(?i)unknown command"):
                await client.execute("NO-SUCH-COMMAND")
            return await client.execute("ECHO", "still here")
        finally:
            await client.aclose()

    assert asyncio.run(main()) == b"still here"


def test_a_killed_connection_is_replaced_on_the_next_call(redis_url: str, r: redis.Redis) -> None:
    async def main() -> tuple[int, object]:
        client = LeanRedis(redis_url, client_name="lean-under-test")
        try:
            assert await client.execute("PING") == b"PONG"
            killed = r.client_kill_filter(_id=next(c["id"] for c in r.client_list() if c["name"] == "lean-under-test"))
            await asyncio.sleep(0.05)  # the loss is noticed
            return killed, await client.execute("ECHO", "again")
        finally:
            await client.aclose()

    assert asyncio.run(main()) == (1, b"again")


def test_an_unreachable_server_is_a_connection_error() -> None:
    async def main() -> None:
        client = LeanRedis(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1)
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await client.execute("PING")

    asyncio.run(main())


def test_a_reply_overdue_fails_the_connection_instead_of_hanging(redis_url: str) -> None:
    """A half-open connection looks like a server that never answers: past `reply_timeout` the call
    fails (once retried) and the client starts afresh."""
    async def main() -> tuple[float, object]:
        client = LeanRedis(redis_url, reply_timeout=0.2)
        try:
            began = time.monotonic()
            with pytest.raises(RedisConnectionError, match="no reply"):
                await client.execute("BLPOP", "never", 5)
            return time.monotonic() - began, await client.execute("PING")
        finally:
            await client.aclose()

    waited, pong = asyncio.run(main())
    assert waited < 2 and pong == b"PONG"


def set_and_get_in_db3(url: str, client_name: str) -> tuple[object, object]:
    """SET then GET through a lean client on `url` (which names database 3), and its CLIENT INFO."""
    async def main() -> tuple[object, object]:
        client = LeanRedis(url, client_name=client_name)
        try:
            await client.execute("SET", "where", "db3")
            info = await client.execute("CLIENT", "INFO")
            return await client.execute("GET", "where"), info
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_login_and_database_from_the_url(redis_url: str, r: redis.Redis) -> None:
    address = RedisAddress.from_url(redis_url)
    r.config_set("requirepass", "s3cret")
    try:
        async def refused() -> None:
            with pytest.raises(RedisConnectionError, match="refused the login"):
                await LeanRedis(f"redis://:nope@{address.host}:{address.port}/0").execute("PING")

        asyncio.run(refused())
        value, info = set_and_get_in_db3(f"redis://:s3cret@{address.host}:{address.port}/3", "lean-login")
        assert value == b"db3" and b" db=3 " in info and b"name=lean-login" in info
    finally:
        r.config_set("requirepass", "")
    assert r.get("where") is None  # written to database 3, not 0


def test_a_unix_socket_url_logs_in_and_selects_its_database(valkey_server: EmbeddedServer, redis_url: str,
                                                             r: redis.Redis) -> None:
    """redis-py's unix:// form, which settings accept and serve hands its processes for the embedded server
    (EmbeddedServer.local_url): the password in the URL or its query, the database in the query."""
    path = valkey_server.socket_path
    assert path is not None and valkey_server.local_url == f"unix://{path}?db=0"
    assert RedisAddress.from_url(f"unix://{path}?db=2&password=pw") == RedisAddress(
        host="", port=0, db=2, password="pw", path=str(path))
    with pytest.raises(ValueError, match="names the socket's path"):
        RedisAddress.from_url("unix://")
    r.config_set("requirepass", "s3cret")
    try:
        value, info = set_and_get_in_db3(f"unix://:s3cret@{path}?db=3", "lean-unix")
        assert value == b"db3" and b" db=3 " in info and b"name=lean-unix" in info
        assert f"addr={path}:0".encode() in info and b" flags=U " in info  # a Unix socket's client
    finally:
        r.config_set("requirepass", "")
    assert r.get("where") is None


def test_a_data_dir_too_long_for_a_socket_path_keeps_tcp(tmp_path: Path) -> None:
    server = EmbeddedServer(data_dir="/tmp/" + "d" * 100, port=6399)
    assert server.socket_path is None and server.local_url == server.url and "--unixsocket" not in server.command()
    short = EmbeddedServer(data_dir=str(tmp_path), port=6399, password="p w")
    assert short.local_url == f"unix://:p%20w@{tmp_path}/valkey.sock?db=0" and "--unixsocket" in short.command()
    assert RedisAddress.from_url(short.local_url).password == "p w"
    odd = EmbeddedServer(data_dir=str(tmp_path / "a#b?c%d"), port=6399)  # characters a URL would take apart
    assert RedisAddress.from_url(odd.local_url).path == str(tmp_path / "a#b?c%d" / "valkey.sock")


def test_a_password_in_a_url_is_masked_in_logs() -> None:
    assert redacted("redis://:s3cret@h:1/0") == "redis://:***@h:1/0" and redacted("redis://h:1/0") == "redis://h:1/0"
    assert redacted("unix://:s3cret@/run/v.sock?db=0") == "unix://:***@/run/v.sock?db=0"
    assert redacted("unix:///run/v.sock?db=1&password=s3cret") == "unix:///run/v.sock?db=1&password=***"


def test_a_missing_unix_socket_is_a_connection_error(tmp_path: Path) -> None:
    async def main() -> None:
        client = LeanRedis(f"unix://{tmp_path}/no.sock", connect_timeout=1)
        with pytest.raises(RedisConnectionError, match=f"cannot connect to Redis at {tmp_path}/no.sock"):
            await client.execute("PING")

    asyncio.run(main())


def test_commands_sent_in_one_turn_go_out_in_one_write(redis_url: str) -> None:
    """The calls a turn of the event loop makes while one is in flight share one write (and the server
    one read); the first, made on an idle connection, and a call made alone are written at once."""
    async def main() -> tuple[list[object], int, object, int]:
        client = LeanRedis(redis_url)
        try:
            await client.execute("PING")
            transport = client._conn.transport  # type: ignore[union-attr]
            writes: list[bytes] = []
            write = transport.write
            transport.write = lambda data: (writes.append(data), write(data))[1]
            replies = await asyncio.gather(*(client.execute("ECHO", f"call {i}") for i in range(50)))
            together = len(writes)
            alone = await asyncio.wait_for(client.execute("ECHO", "alone"), 1)
            return replies, together, alone, len(writes)
        finally:
            await client.aclose()

    replies, together, alone, total = asyncio.run(main())
    assert replies == [f"call {i}".encode() for i in range(50)] and together == 2  # the first, then 49 at once
    assert alone == b"alone" and total == 3


def test_a_call_on_an_idle_connection_is_written_before_the_turn_ends(redis_url: str, r: redis.Redis) -> None:
    """The first token's calls (the API's submit, a worker's first append) wait for no loop hop: the
    server has the command while the caller's turn still runs. Made while another is in flight, a call
    waits for the turn's end, to share its write."""
    async def main() -> tuple[str | None, str | None, list[object]]:
        client = LeanRedis(redis_url)
        try:
            await client.execute("PING")
            conn = client._conn
            assert conn is not None
            # From here to the gather, nothing yields to the loop: only what was written is on the server.
            first = conn.send(encode(("SET", "idle-call", "1")))
            time.sleep(0.2)
            idle = r.get("idle-call")
            second = conn.send(encode(("SET", "busy-call", "1")))  # the first is in flight
            time.sleep(0.2)
            busy = r.get("busy-call")
            return idle, busy, await asyncio.gather(*first, *second)
        finally:
            await client.aclose()

    idle, busy, replies = asyncio.run(main())
    assert idle == "1" and busy is None and replies == [b"OK", b"OK"]
    assert r.get("busy-call") == "1"


def test_a_connection_lost_before_its_turn_ends_does_not_strand_the_calls_it_held(redis_url: str) -> None:
    """Its calls are not written to the dead connection, nor left waiting: each fails with it and, as
    any call on a connection that died unnoticed, is sent once more on a fresh one."""
    async def main() -> tuple[list[object], bool]:
        client = LeanRedis(redis_url)
        try:
            await client.execute("PING")
            conn = client._conn
            assert conn is not None
            pending = asyncio.gather(*(client.execute("ECHO", "again") for _ in range(3)))
            await asyncio.sleep(0)  # the calls are queued for this turn's write
            assert conn.outgoing and not conn.lost
            conn._fail(RedisConnectionError("lost"))
            return await asyncio.wait_for(pending, 2), client._conn is not conn
        finally:
            await client.aclose()

    assert asyncio.run(main()) == ([b"again"] * 3, True)
