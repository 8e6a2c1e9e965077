"""A response that has not started within a few seconds becomes a 503 with Retry-After.

A Redis that neither answers nor fails (a network blackhole, a server stopped by SIGSTOP) would
otherwise hold every caller for the client's socket timeouts: 15 s, twice with the retry on a fresh
connection. Measured in the blackhole drill (`sluicegate bench drills`): calls hung for the whole
10 s outage, none answered 503. The deadline is lifted once the response starts, so event streams are
never cut by it, or by the route once the store has answered (`lift_response_deadline`): a non-streamed
chat answer's status waits for the request's end, as a backend's own does (api/openai_routes.py).

The deadline counts from the request's start, and again from each part of its body that arrives: a
large prompt on a slow link (up to `--max-body-mb`) that keeps arriving is never cut, and the answer
then has the whole deadline once its body is in. The upload is the client's, not Redis's: a body
that stalls (no bytes for as long as the deadline) ends in `408 request_timeout` with
`Connection: close`, never a 503 that blames the store. Nothing is stored for it (no route acts on
part of a body). The app's `receive` is wrapped, so the cost is one timer reschedule per part of the
body, and no extra task or wait.

A submit cut while its call to the store is out (written, or about to be) may still be stored: a stalled
store runs it once it resumes. Its route notes the answer for that case in the scope (`note_pending_submit`),
and the deadline answers it instead of the plain 503: the 503 `maybe_stored` that names the request, without
Retry-After (api/requests_routes.py `maybe_stored`), since a retry would store and generate it a second time.
A cut before that call (a key check, a cached lookup) stored nothing: the plain 503 that says retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluicegate.api.errors import RETRY_AFTER, ApiError, error_response

log = logging.getLogger(__name__)

RESPONSE_DEADLINE_SECONDS = 5.0
LIFT = "sluicegate.lift_response_deadline"  # the scope's key of the function that lifts it
PENDING_SUBMIT = "sluicegate.pending_submit"  # the scope's key of a submit's answer while its store call is out


def lift_response_deadline(scope: Scope) -> None:
    """The store has answered (the request is stored): from here the response may take as long as the
    request does. Without it, a status held for the request's end would be a 503 that the SDK retries,
    each retry a request stored again."""
    lift = scope.get(LIFT)
    if lift is not None:
        lift()


def note_pending_submit(scope: Scope, answer: Callable[[], ApiError] | None) -> None:
    """A submit's call to the store is going out: a deadline that fires from here answers `answer()` (the 503
    `maybe_stored` naming the request: made only then, not on every submit), not the plain 503 a client
    retries. None: it is known that nothing was stored (the store refused it, or the call never went out)."""
    if answer is None:
        scope.pop(PENDING_SUBMIT, None)
    else:
        scope[PENDING_SUBMIT] = answer


class ResponseDeadline:
    def __init__(self, app: ASGIApp, seconds: float = RESPONSE_DEADLINE_SECONDS) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        body_done = False  # the last part of the body (or a disconnect) has been received
        awaiting_body = False  # the app waits on the client's body: a deadline that fires now is a stall
        deadline = asyncio.timeout(self.seconds)

        async def receive_body() -> Message:
            """Each part of the body moves the deadline on: it counts from the last progress."""
            nonlocal body_done, awaiting_body
            if body_done or started:  # the deadline is the response's alone (or lifted)
                return await receive()
            awaiting_body = True
            message = await receive()
            if deadline.expired():  # fired as the body arrived: the cancel lands at the next await (a 408)
                return message
            awaiting_body = False
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                deadline.reschedule(asyncio.get_running_loop().time() + self.seconds)
            else:
                body_done = True  # the client left
            return message

        def lift() -> None:
            nonlocal started
            if not deadline.expired():  # an expiry an instant ago is already on its way (the 503)
                deadline.reschedule(None)
                started = True  # the body's reads are no longer timed either

        scope[LIFT] = lift

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
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
            async with deadline:
                await self.app(scope, receive_body, send_started)
        except TimeoutError:
            if started:
                raise
            if awaiting_body:
                response = error_response(408, f"the request body stalled: no bytes for {self.seconds:g} s; "
                                               "nothing was stored, send the request again",
                                          headers={"Connection": "close"})
            elif (answer := scope.get(PENDING_SUBMIT)) is not None:
                pending = answer()
                log.warning("a submit not answered within %g s (its call to the store is out): %s", self.seconds,
                            pending.message)
                response = pending.response()
            else:
                response = error_response(503, f"not answered within {self.seconds:g} s (the queue store, or "
                                               "this API process, is unavailable or overloaded); retry shortly",
                                          headers=RETRY_AFTER)
            await response(scope, receive, send)
