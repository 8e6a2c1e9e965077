"""The throughput clients' HTTP: one call, `fetch(method, url, body, headers) -> (status, body)`, on two clients.

On 2 cores the load generator shares the cores with what it measures, so every millisecond of the
client's CPU is taken from Sluicegate's figure (DESIGN.md: "use a client that is not the bottleneck
and report its CPU"). `lean` is the openai engine's own HTTP/1.1 client (workers/engines/http1.py: kept
connections to one origin, a request written in one write, the head parsed once) on uvloop; `aiohttp`
is what every figure before 2026-12-04 used, kept so that the two can be compared in one run
(`--client`). Both read each body whole and keep their connections alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from sluicegate.loadtest.common import client_session
from sluicegate.workers.engines.http1 import HTTP1Client

CLIENTS = ("lean", "aiohttp")
MAX_BODY = 16 * 2**20  # bytes of one response: a throughput answer is a few kB
READ_TIMEOUT = 120.0  # seconds for a whole answer (as client_session's sock_read): a stalled one is an error
T = TypeVar("T")


class BenchHTTP(Protocol):
    async def fetch(self, method: str, url: str, body: bytes = b"",
                    headers: dict[str, str] | None = None) -> tuple[int, bytes]: ...

    async def aclose(self) -> None: ...


class LeanHTTP:
    """Kept connections per origin, with no limit on their number (one per concurrent client)."""

    def __init__(self) -> None:
        self._origins: dict[str, HTTP1Client] = {}

    async def fetch(self, method: str, url: str, body: bytes = b"",
                    headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        client = self._origins.get(origin)
        if client is None:
            client = self._origins[origin] = HTTP1Client(origin, {}, connect_timeout=10.0)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        async with asyncio.timeout(READ_TIMEOUT):
            response = await client.request(method, path, body, headers)
            data = await response.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise RuntimeError(f"{method} {path}: a body over {MAX_BODY} bytes")
        return response.status, data

    async def aclose(self) -> None:
        for client in self._origins.values():
            await client.aclose()


class AiohttpHTTP:
    def __init__(self, connections: int) -> None:
        self.session = client_session(connections)  # every other bench's aiohttp session

    async def fetch(self, method: str, url: str, body: bytes = b"",
                    headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        async with self.session.request(method, url, data=body or None, headers=headers) as response:
            return response.status, await response.read()

    async def aclose(self) -> None:
        await self.session.close()


def bench_http(kind: str, connections: int) -> BenchHTTP:
    if kind == "lean":
        return LeanHTTP()
    if kind == "aiohttp":
        return AiohttpHTTP(connections)
    raise ValueError(f"unknown client {kind!r}: one of {', '.join(CLIENTS)}")


def run_on_loop(kind: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`main()` on the loop the client runs on: uvloop for `lean` where it is installed (as Sluicegate's
    own processes run), asyncio's for `aiohttp` (as every earlier figure was taken)."""
    if kind == "lean":
        try:
            import uvloop  # installed with uvicorn[standard], except where it does not build (Windows, PyPy)
        except ImportError:
            pass
        else:
            return uvloop.run(main())
    return asyncio.run(main())
