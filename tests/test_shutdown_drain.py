"""The event streams of a loop end when the server starts shutting down (api/responses.py ShutdownDrain),
those whose response starts after the signal too: a route still reading Redis when SIGTERM landed must not
keep its stream open until uvicorn's graceful-shutdown timeout cuts it."""

from __future__ import annotations

import asyncio

from sse_starlette.sse import AppStatus

from sluicegate.api.responses import ShutdownDrain
from tests.helpers import until


def test_a_stream_added_after_the_shutdown_signal_is_ended_too() -> None:
    async def scenario() -> None:
        drain = ShutdownDrain()
        ended: list[str] = []
        drain.add(lambda: ended.append("before"))
        await asyncio.sleep(0.05)  # its watcher waits for the signal
        assert ended == []
        AppStatus.should_exit = True  # what uvicorn's signal handler sets, through sse-starlette's hook
        await until(lambda: ended == ["before"], "the open stream's end", timeout=5)
        drain.add(lambda: ended.append("after"))  # a route that was still on its way to its response
        await until(lambda: ended == ["before", "after"], "the late stream's end", timeout=2)

    try:
        asyncio.run(scenario())
    finally:
        AppStatus.should_exit = False
