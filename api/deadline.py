"""A response that has not started within a few seconds becomes a 503 with Retry-After.

A Redis that neither answers nor fails (a network blackhole, a server stopped by SIGSTOP) would
otherwise hold every caller for the client's socket timeouts: 15 s, twice with the retry on a fresh
connection. Measured in the blackhole drill (`sluicegate bench drills`): calls hung for the whole
10 s outage, none answered 503. The deadline is lifted once the response starts, so event streams
and a non-streamed chat answer (its headers go out at once) are never cut by it.

A submit cut by it may still have been stored: the client sees a 503 for a request that runs anyway,
the same uncertainty as a dropped connection (a retry with the same session is a new request).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluicegate.api.errors import RETRY_AFTER, error_response

RESPONSE_DEADLINE_SECONDS = 5.0


class ResponseDeadline:
    def __init__(self, app: ASGIApp, seconds: float = RESPONSE_DEADLINE_SECONDS) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        deadline: asyncio.Timeout | None = None

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                if deadline is not None:
                    if deadline.expired():
                        # Fired an instant ago: a cancel not yet delivered lands here (CancelledError ->
                        # TimeoutError: the 503 below). One that the app already swallowed is spent: the
                        # response goes on, and a fired timeout cannot be rescheduled.
                        await asyncio.sleep(0)
                    else:
                        deadline.reschedule(None)
                started = True
            await send(message)

        try:
            async with asyncio.timeout(self.seconds) as deadline:
                await self.app(scope, receive, send_started)
        except TimeoutError:
            if started:
                raise
            response = error_response(503, f"not answered within {self.seconds:g} s (the queue store, or this API "
                                           "process, is unavailable or overloaded); retry shortly",
                                      headers=RETRY_AFTER)
            await response(scope, receive, send)
