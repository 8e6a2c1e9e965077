"""The per-request routes straight to their handlers, past FastAPI's router and dependency machinery.

Every first token waits on these routes: POST /v1/chat/completions, and the resumable route's two
requests, POST /v1/sessions/{id}/requests then GET /v1/requests/{id}/events (and a session's
stream, GET /v1/sessions/{id}/events, on a resume's way). Traced end to end, 0.64
ms of the 1.15 ms between a client's send and the chat handler went through FastAPI (routing over
every route, dependency solving, its middleware layers). In-process, a chat request up to its submit
(answered with an error there) took 275 us through FastAPI's body and dependency handling, 190 us
with the route reading its own body, and 70 us through this path. Everything else, and these routes'
OpenAPI entries, stays with FastAPI. It sits inside the body size limit and FastAPI's server-error
layer (an unexpected error is still a JSON 500), and answers the errors the API expects exactly as
FastAPI's handlers do.

The submit and the event stream take only their ordinary form here; anything unusual goes to FastAPI,
which answers it as before: a submit whose body is not `application/json` (a 415, or a +json type FastAPI
reads), or does not parse or validate (FastAPI's 422 names the field; its 401 comes before a body's 422),
or holds an integer orjson would read as a float, or nests deeper than the submit takes (FastAPI's parser
refuses the deepest bodies itself), the body replayed, since it was read; an event stream with a `?token=`
(browsers), and HEAD.
"""

from __future__ import annotations

import re

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluicegate.api import openai_routes
from sluicegate.api.errors import error_response, expected_error_response
from sluicegate.api.requests_routes import NestedTooDeep, content_type, submit_body
from sluicegate.api.schemas import SubmitBody
from sluicegate.api.services import principal, services
from sluicegate.api.streaming import request_stream, session_stream

SUBMIT = re.compile(r"/v1/sessions/([^/]+)/requests")
REQUEST_EVENTS = re.compile(r"/v1/requests/([^/]+)/events")
SESSION_EVENTS = re.compile(r"/v1/sessions/([^/]+)/events")
# 19 digits or more: an integer may be past 64 bits (-9223372036854775809 already is), which orjson reads as a
# float and FastAPI's json.loads exactly. A scan in C; a body with such a run (a float's digits too) goes to FastAPI.
LONG_NUMBER = re.compile(rb"\d{19}")


def token_given(scope: Scope) -> bool:
    """A `?token=` (a browser's stream token): FastAPI's dependency checks it."""
    return bool(scope.get("query_string")) and "token" in Request(scope).query_params


class ChatHotPath:
    """Pure ASGI middleware: serves the per-request routes itself, passes everything else on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        response: Response | Receive | None = None
        try:
            if method == "POST" and path == "/v1/chat/completions":
                response = await openai_routes.chat_completions(Request(scope, receive))
            elif method == "POST" and (match := SUBMIT.fullmatch(path)) and content_type(scope) == b"application/json":
                response = await self.submit(Request(scope, receive), match.group(1))
            elif method == "GET" and (match := REQUEST_EVENTS.fullmatch(path)) and not token_given(scope):
                request = Request(scope, receive)
                response = await request_stream(services(request), await principal(request), match.group(1), request)
            elif method == "GET" and (match := SESSION_EVENTS.fullmatch(path)) and not token_given(scope):
                request = Request(scope, receive)  # a resume's way (loadtest/scenarios/resume.py)
                response = await session_stream(services(request), await principal(request), match.group(1), request)
        except Exception as error:
            answer = expected_error_response(error)
            if answer is None:
                raise
            response = answer
        if isinstance(response, Response):
            await response(scope, receive, send)
        else:  # not ours, or unusual: FastAPI answers (a body already read is replayed)
            await self.app(scope, response or receive, send)

    @staticmethod
    async def submit(request: Request, session_id: str) -> Response | Receive:
        """POST /v1/sessions/{id}/requests with a valid JSON body; else the `receive` that replays the body
        to FastAPI, which answers it."""
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone mid-body, or cut off by the body size limit (which answered 413)
            return error_response(400, "There was an error parsing the body")  # FastAPI's words
        if LONG_NUMBER.search(raw):
            return replay(raw, request.receive)
        try:
            body = SubmitBody.model_validate(orjson.loads(raw))
        except (orjson.JSONDecodeError, ValidationError):
            return replay(raw, request.receive)
        try:
            return await submit_body(request, await principal(request), session_id, body)
        except NestedTooDeep:  # refused before anything is stored; FastAPI's answer may be its parser's 400
            return replay(raw, request.receive)


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for a body already read: the body once, then the connection's own messages."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
