"""Response classes: JSON rendered with orjson (FastAPI's JSON is deprecated), and a lean event stream."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import orjson
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ShutdownDrain:
    """Ends the open event streams of an event loop when the server starts shutting down, as
    sse-starlette does for its own responses (its shutdown signal, one watcher task per loop rather
    than one per stream): a client sees its stream end and resumes elsewhere with Last-Event-ID,
    instead of the server waiting out its graceful-shutdown timeout and then cancelling it."""

    def __init__(self) -> None:
        self.open: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[Callable[[], None]]] = (
            weakref.WeakKeyDictionary())
        self.drained: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()  # the signal came
        self.watchers: set[asyncio.Task[None]] = set()

    def add(self, end: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        if loop in self.drained:  # a stream whose response starts once the server is shutting down ends at once
            loop.call_soon(end)
            return
        ends = self.open.get(loop)
        if ends is None:
            ends = self.open[loop] = set()
            watcher = loop.create_task(self._watch(loop, ends))
            self.watchers.add(watcher)
            watcher.add_done_callback(self.watchers.discard)
        ends.add(end)

    def discard(self, end: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError, KeyError):
            self.open[asyncio.get_running_loop()].discard(end)

    async def unless_shutdown(self, wait: Coroutine[Any, Any, T]) -> tuple[T | None, bool]:
        """`wait`'s result and False; or, when the server starts shutting down first, None and True at once
        (a route that waits before its response starts answers then, rather than be cut by uvicorn's
        graceful-shutdown timeout and its plain 500): the wait is cancelled by this task's own cancel,
        withdrawn here (any other cancel propagates)."""
        task = asyncio.current_task()
        drained = over = False

        def drain() -> None:
            nonlocal drained
            if not (drained or over) and task is not None:
                drained = True
                task.cancel()

        self.add(drain)
        try:
            return await wait, False
        except asyncio.CancelledError:
            if not drained or task is None or task.uncancel() > 0:
                raise
            return None, True
        finally:
            over = True  # a drain the loop calls later (shutdown begun before `add`) cancels nothing
            self.discard(drain)

    async def _watch(self, loop: asyncio.AbstractEventLoop, ends: set[Callable[[], None]]) -> None:
        from sse_starlette import EventSourceResponse  # its uvicorn hook is installed on import

        await EventSourceResponse._listen_for_exit_signal()
        self.drained.add(loop)  # from now on `add` ends a stream itself: this watcher is done
        for end in list(ends):
            end()


DRAIN = ShutdownDrain()


class LastChunk(bytes):
    """A stream's last chunk (its terminal event): it goes out with the end of the body, in one socket
    write and one read for the client, instead of a write for the chunk and another for the end."""


class EventStreamResponse(Response):
    """A streamed body without Starlette's per-response task group: a disconnect cancels the
    streaming task directly. A client that leaves stops only this response; the generation goes on.

    The status line and headers are sent at once, while the first token is still being generated;
    the API's transport (api/joined_writes.py) writes them with the first chunk, in one write, when
    it comes within `HEAD_WAIT_SECONDS`. (Sent by the app with the first token, as two writes, they
    cost the first token 0.22 ms.) So a failure before the first chunk (Redis lost right after the
    submit) ends a 200 response early instead of answering 500: a streaming client sees the stream
    cut short, as it would mid-stream.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str],
                 on_close: Callable[[], None] | None = None, end_on_shutdown: bool = False) -> None:
        self.status_code = 200
        self.end_on_shutdown = end_on_shutdown  # an SSE stream (resumable): ShutdownDrain ends it
        self.on_close = on_close  # called once the response ends, however (e.g. a tenant's stream count)
        self.background = None
        self.init_headers(headers)  # no body set: no content-length, so the body goes out chunked
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        left = drained = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            if streaming is not None:
                streaming.cancel()

        def drain() -> None:
            nonlocal drained
            if not (left or drained) and streaming is not None:
                drained = True
                streaming.cancel()

        watcher = asyncio.ensure_future(watch())
        if self.end_on_shutdown:
            DRAIN.add(drain)
        try:
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.chunks:
                    last = isinstance(chunk, LastChunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                    if last:
                        return
            except asyncio.CancelledError:
                # Ours (the client left, or the server is shutting down): swallowed, and the cancel
                # request withdrawn. Anything else propagates.
                if not (left or drained) or streaming is None or streaming.uncancel() > 0:
                    raise
                if left:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if self.end_on_shutdown:
                DRAIN.discard(drain)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher  # retrieved: a failed receive() is not left unobserved
            try:
                await self.chunks.aclose()  # type: ignore[attr-defined]
            finally:
                if self.on_close is not None:
                    self.on_close()
