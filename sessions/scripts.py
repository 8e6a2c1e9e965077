"""The Lua scripts, loaded into Redis as one function library and called with FCALL.

A function library is loaded once (FUNCTION LOAD) and kept by the server, persisted with its data:
common.lua runs at load time and each script in lua/ becomes a function of the library. Sent as
EVALSHA scripts, every call re-ran common.lua's definitions first, which measured about 37 µs of
server time per call (most of a small script's cost). Redis >= 7.0 and Valkey have functions.

The library's name and its functions' names carry a digest of the source, so processes of two
versions (a rolling upgrade) each call their own code. A server that lost the library (a fresh or
flushed server) gets it again on the first call that finds it missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from sessions.keys import BUCKETS
from sessions.resp import LeanRedis

LUA_DIR = Path(__file__).parent / "lua"
SCRIPT_NAMES = ("submit", "append", "finish", "handback", "cancel", "heartbeat", "register_worker",
                "sweep", "read_log")


def _common() -> str:
    common = (LUA_DIR / "common.lua").read_text()
    return common.replace("{{BUCKETS}}", ", ".join(repr(b) for b in BUCKETS))


@cache
def script_source(name: str) -> str:
    """One script's own text (without common.lua), as in its file."""
    return (LUA_DIR / f"{name}.lua").read_text()


@cache
def _digest() -> str:
    text = _common() + "".join(script_source(name) for name in SCRIPT_NAMES)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def function_name(name: str) -> str:
    return f"sg_{_digest()}_{name}"


# Functions that only read, flagged so: the server runs them where it refuses writes (a replica, or
# a full server under noeviction), as it did the EVAL scripts.
READ_ONLY = frozenset({"read_log"})


@cache
def library_source() -> str:
    """The whole library: common.lua, then each script registered as a function of (KEYS, ARGV)."""
    parts = [f"#!lua name=sluicegate_{_digest()}", _common()]
    for name in SCRIPT_NAMES:
        flags = ", flags = { 'no-writes' }" if name in READ_ONLY else ""
        parts.append(f"redis.register_function{{ function_name = '{function_name(name)}', "
                     f"callback = function(KEYS, ARGV)\nbegin_call()\nreturn end_call(pcall(function()\n"
                     f"{script_source(name)}\nend))\nend{flags} }}")
    return "\n".join(parts) + "\n"


def _library_missing(error: ResponseError) -> bool:
    return "function not found" in str(error).lower()


class Scripts:
    """The library's functions for one Redis client: `scripts.submit(keys, args)`, awaitable unless the
    client is redis-py's synchronous one (tests, tools). The calls on a first token's way use the
    lean client (sessions/resp.py)."""

    submit: Callable[..., Any]
    append: Callable[..., Any]
    finish: Callable[..., Any]
    handback: Callable[..., Any]
    cancel: Callable[..., Any]
    heartbeat: Callable[..., Any]
    register_worker: Callable[..., Any]
    sweep: Callable[..., Any]
    read_log: Callable[..., Any]

    def __init__(self, client: Redis | AsyncRedis | LeanRedis) -> None:
        self.client = client
        make = self._sync_function if isinstance(client, Redis) else self._async_function
        for name in SCRIPT_NAMES:
            setattr(self, name, make(function_name(name)))

    def load(self) -> Any:
        """Load (or reload) the library; an awaitable unless the client is synchronous."""
        if isinstance(self.client, LeanRedis):
            return self.client.execute("FUNCTION", "LOAD", "REPLACE", library_source())
        return self.client.function_load(library_source(), replace=True)

    def _fcall(self, fname: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if isinstance(self.client, LeanRedis):
            return self.client.execute("FCALL", fname, len(keys), *keys, *args)
        return self.client.fcall(fname, len(keys), *keys, *args)

    def _sync_function(self, fname: str) -> Callable[..., Any]:
        def call(keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
            try:
                return self._fcall(fname, keys, args)
            except ResponseError as error:
                if not _library_missing(error):
                    raise
            self.load()
            return self._fcall(fname, keys, args)

        return call

    def _async_function(self, fname: str) -> Callable[..., Awaitable[Any]]:
        async def call(keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
            try:
                return await self._fcall(fname, keys, args)
            except ResponseError as error:
                if not _library_missing(error):
                    raise
            await self.load()
            return await self._fcall(fname, keys, args)

        return call
