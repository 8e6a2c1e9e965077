"""`POST /v1/chat/completions`: the OpenAI-compatible face of submit + stream.

The call is an ordinary Sluicegate request: headers `X-Session-Id` (default: a fresh session per
call), `X-Priority` (0..9 or low|normal|high|critical), `X-Tenant`, `X-Group`, `X-Deadline-Ms` and
`X-On-Deadline-Miss` (run|fail) map to the submit fields; `model` picks the group (see `chat_group`);
body fields Sluicegate does not use (temperature, top_p, stop, tools, logprobs, ...) go to the engine
as params. Its events become
OpenAI objects (api/chat_render.py), carrying what the backend said: the text, tool-call deltas,
logprobs, the finish_reason and the usage:
- stream true: one `chat.completion.chunk` per token (the first also carries the role), then a
  chunk with an empty delta, the finish_reason and the usage, then `data: [DONE]`. With
  `stream_options.include_usage` the usage moves to a last chunk with no choices, as OpenAI sends it.
  The status goes out with the first token (or an idle ping, `--sse-ping-seconds`, before one): a
  request refused or failed before it gets its own status, as below, which the SDK raises as its own
  class (BadRequestError for a context too long); after it, the stream ends with an error object.
- stream false: the status, headers (`X-Request-Id`, `X-Session-Id`) and `chat.completion` wait for the
  request's end, as a backend's own answer does, so that one that failed or was cancelled gets its own
  status (409 cancelled, the backend's 400, 413 or 422, else 502), which OpenAI's SDKs raise on: they read
  no error out of a 200's body. The response deadline (api/deadline.py) is lifted once the request is
  stored.
- `error` and `cancelled` end the answer with an OpenAI-style error object (in the stream once it has
  begun, then `[DONE]`; else the answer with its own status).
- the store (Redis) unavailable once the request is stored, before the status went out: a 503 with the
  request's ids and `x-should-retry: false` (the SDK's retry would store and generate it again); the
  request runs on, readable at its events URL. Before the submit it is the plain 503 (`Retry-After`).
  The same 503 when the API process starts shutting down (SIGTERM) while the status waits, rather than
  uvicorn's plain 500 once its graceful-shutdown timeout cancels the route; a stream still running just
  before that timeout ends with that error object and `[DONE]` (ShutdownEnd), not cut when uvicorn closes
  its connection (one that ends within the grace goes out whole).
- a stream that ends without its terminal event (its reader fell so far behind that the session's log
  was trimmed past it) ends with an error object and `[DONE]`, not silently (a truncated answer).

Generation never depends on the client: a caller that disconnects leaves the request running, and
its tokens stay readable at `/v1/requests/{X-Request-Id}/events`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from sluicegate.api.auth import Principal
from sluicegate.api.callbacks import attach_callback, check_callback
from sluicegate.api.chat_render import DONE, Completion
from sluicegate.api.deadline import lift_response_deadline
from sluicegate.api.errors import ApiError
from sluicegate.api.key_watch import ENDED_MESSAGE, KeyWatch, key_watch
from sluicegate.api.models_routes import model_not_found
from sluicegate.api.requests_routes import (
    check_group,
    check_session_id,
    check_session_owner,
    require_json,
    submit_owner,
    submit_request,
)
from sluicegate.api.responses import DRAIN, JSON, EventStreamResponse, LastChunk
from sluicegate.api.schemas import ChatBody, default_max_tokens, parse_priority
from sluicegate.api.services import Services, principal, services
from sluicegate.api.streaming import PING, SSE_HEADERS
from sluicegate.scheduler.deadlines import MAX_DEADLINE_MS
from sluicegate.sessions.connect import store_unavailable
from sluicegate.sessions.events import Event
from sluicegate.sessions.hub import Reader
from sluicegate.sessions.keys import NAME
from sluicegate.sessions.registry import DEFAULT_GROUP
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.runs import BACKEND_REFUSED
from sluicegate.sessions.stream import EventStream
from sluicegate.settings import GRACEFUL_SHUTDOWN_SECONDS

log = logging.getLogger(__name__)
router = APIRouter()
# Handled here, not by the engine; on_deadline_miss is the X-On-Deadline-Miss header's, a body field is ignored
# A chat stream still running at the graceful shutdown's end ends itself this long before it (ShutdownEnd): time
# for its error object and [DONE] to go out before uvicorn closes the connection.
SHUTDOWN_END_MARGIN = 0.5
NOT_PARAMS = frozenset({"stream_options", "on_deadline_miss"})
PASSED_ON = frozenset({400, 413, 422})  # a backend's refusals the caller gets as they are: its request is wrong
KEY_ENDED = {"error": {"type": "unauthorized", "message": ENDED_MESSAGE, "code": "unauthorized", "status": 401}}
# On a stored request's error answer: OpenAI's SDKs retry 409 and 5xx by default, each retry a new request
# (a cancelled call submitted again, a failed or still running one generated twice); they obey this header.
NO_RETRY = {"x-should-retry": "false"}


def openai_error(status: int, type_: str, message: str) -> dict[str, dict[str, Any]]:
    """OpenAI's error object. Its `code` is a string (OpenAI's schema and this API's ErrorDetail): the type;
    `status` the failure's status, which an error inside a 200 stream has no other place for (a backend's
    413 or 422 refusal is `invalid_request` too)."""
    return {"error": {"type": type_, "message": message, "code": type_, "status": status}}


def stored_failure(status: int, type_: str, message: str, headers: dict[str, str]) -> JSON:
    """The answer of a stored request that failed, was cancelled or cannot be followed: its status and
    OpenAI error object, its ids, and no retry by the SDK (the request was not lost: it was answered)."""
    return JSON(openai_error(status, type_, message), status_code=status, headers={**headers, **NO_RETRY})


def store_lost(error: Exception, new: NewRequest, headers: dict[str, str], *, callback_unsure: bool = False) -> JSON:
    """The answer when the store fails after the submit stored the request: not the plain 503 that the SDK
    retries (a second request, generated again), but the stored request's 503, with its ids. `callback_unsure`:
    it failed noting the X-Callback-Url, which may or may not have been noted (the answer lost after it ran)."""
    log.warning("redis unavailable after submit of %s: %s: %s", new.request_id, type(error).__name__, error)
    unsure = (", but its callback may not have been noted (GET /v1/requests/{id} shows a `callback` when it was)"
              if callback_unsure else "")
    message = (f"the queue store (Redis) is unavailable; the request was stored and runs on{unsure}: "
               f"read it at /v1/requests/{new.request_id}/events")
    return stored_failure(503, "unavailable", message, headers)


def shutting_down(new: NewRequest, headers: dict[str, str]) -> JSON:
    """The answer of a stored request whose status still waits when the API process starts shutting down:
    not uvicorn's plain 500 after its graceful-shutdown timeout, which the SDK retries (generated again)."""
    message = ("the API process is shutting down; the request was stored and runs on: "
               f"read it at /v1/requests/{new.request_id}/events")
    return stored_failure(503, "unavailable", message, headers)


def header_name(request: Request, header: str, default: str) -> str:
    value = request.headers.get(header, default).strip() or default
    if not NAME.fullmatch(value):
        raise ApiError(422, f"{header}: 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


async def chat_group(body: ChatBody, request: Request) -> str:
    """`X-Group` wins; else the group serving `model`, or the group of that name; no model: `default`.
    An unknown model is a 404 `model_not_found` (a group X-Group names that does not exist is the
    submit's 404 `unknown_group`). The lookup is cached (api/directory.py): no round trip per call."""
    if request.headers.get("x-group", "").strip():
        return header_name(request, "X-Group", DEFAULT_GROUP)
    if not body.model:
        return DEFAULT_GROUP
    group = await services(request).directory.group_for(body.model)
    if group is None:
        raise model_not_found(body.model)
    return group


async def new_request(body: ChatBody, request: Request, who: Principal) -> NewRequest:
    """Headers and body to a Sluicegate request (422 on anything it cannot take, then 404 on an
    unknown model)."""
    session_id = request.headers.get("x-session-id") or "chat-" + secrets.token_urlsafe(12)
    check_session_id(session_id)
    try:
        # empty: the default, as an empty X-Tenant, X-Group or X-Session-Id is
        priority = parse_priority(request.headers.get("x-priority", "").strip() or "5")
    except ValueError as error:
        raise ApiError(422, f"X-Priority: {error}") from None
    deadline = request.headers.get("x-deadline-ms", "").strip()
    if deadline and not (deadline.isascii() and deadline.isdigit() and len(deadline) <= 16  # int(): <= 4300 digits
                         and 1 <= int(deadline) <= MAX_DEADLINE_MS):
        raise ApiError(422, f"X-Deadline-Ms: a deadline in ms, 1..{MAX_DEADLINE_MS}")
    on_miss = request.headers.get("x-on-deadline-miss", "").strip().lower() or "run"  # the submit's on_deadline_miss
    if on_miss not in ("run", "fail"):
        raise ApiError(422, "X-On-Deadline-Miss: run or fail")
    extra = dict(body.model_extra or {})
    if extra.get("n") is None:  # absent, or null (OpenAI's schema allows it): the default, 1
        extra.pop("n", None)
    elif extra["n"] != 1 or isinstance(extra["n"], bool):  # true == 1 in Python, not in OpenAI's schema
        raise ApiError(422, "n: only 1 is supported")
    return NewRequest(
        session_id=session_id, priority=priority,
        # none given: the default within --max-tokens-limit (a given one above it is the submit's 422)
        max_tokens=(body.max_completion_tokens or body.max_tokens
                    or default_max_tokens(services(request).settings.max_tokens_limit)),
        tenant=who.tenant or header_name(request, "X-Tenant", "default"),
        group=await chat_group(body, request),
        messages=[m.model_dump() for m in body.messages],
        params={k: v for k, v in extra.items() if k not in NOT_PARAMS},
        deadline_ms=int(deadline) if deadline else None, fail_on_deadline_miss=on_miss == "fail")


def failure(event: Event) -> tuple[int, str, str]:
    """Status, type and message of a request that ended without `done`: 409 cancelled, the backend's own
    400, 413 or 422 when it refused the request (a context too long, a bad parameter: calling again will
    not help), else 502 (a backend's 401, 403 or 404 is about Sluicegate's own call, not the caller's)."""
    if event.name == "cancelled":
        return 409, "cancelled", "the request was cancelled"
    message = str(orjson.loads(event.data).get("message") or "the generation failed")
    if (refused := BACKEND_REFUSED.match(message)) and int(refused.group(1)) in PASSED_ON:
        return int(refused.group(1)), "invalid_request", message
    return 502, "generation_failed", message


def request_event_stream(svc: Services, new: NewRequest, *, first: int, joined: Reader | None) -> EventStream:
    """The request's events from its first one (`first_event_id` of the submit). `joined`: a reader that
    joined the session's channel before the submit (all its events come live, no log read); else the
    stream joins then reads the log (correct even if the request has already ended), no status read."""
    return EventStream(svc.store, svc.hub, new.session_id, after=first - 1, request_id=new.request_id,
                       request_status="queued", joined=joined, idle_seconds=svc.settings.sse_ping_seconds)


async def first_news(batches: AsyncIterator[list[Event]]) -> tuple[list[list[Event]], Event | None]:
    """A streamed answer's batches up to the first that tells how it goes: a token (it runs), its terminal
    event, or an idle ping (`--sse-ping-seconds` without an event: still queued, or a slow prefill).
    Returns them, and the terminal event if it ended before its first token."""
    held: list[list[Event]] = []
    async for batch in batches:
        held.append(batch)
        if not batch:
            break
        for event in batch:
            if event.terminal:
                return held, event
            if event.name == "token":
                return held, None
    return held, None


class ShutdownEnd:
    """Ends a streamed answer that is still running just before the API process's graceful shutdown runs
    out (GRACEFUL_SHUTDOWN_SECONDS after the signal, DRAIN), rather than uvicorn cutting its connection then,
    a truncated body the SDK raises as a connection error, with no word of the request that runs on. An
    answer that ends within the grace goes out whole: unlike a resumable stream, which ends at the signal
    (its client reconnects where it was), a chat client cannot resume. Registered once per stream: the end
    cancels the wait for the next batch (`next`), never a write to the client; one that comes meanwhile is
    seen at the next wait."""

    __slots__ = ("due", "task", "timer", "waiting")

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.due = self.waiting = False
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        """The shutdown's signal: the end comes SHUTDOWN_END_MARGIN before the grace runs out."""
        if self.timer is None and not self.due:
            delay = max(0.0, GRACEFUL_SHUTDOWN_SECONDS - SHUTDOWN_END_MARGIN)
            self.timer = asyncio.get_running_loop().call_later(delay, self.end)

    def end(self) -> None:
        if not self.due:
            self.due = True
            if self.waiting and self.task is not None:
                self.task.cancel()

    def close(self) -> None:
        """The stream is over: no end to come."""
        if self.timer is not None:
            self.timer.cancel()

    async def next(self, batches: AsyncIterator[list[Event]]) -> list[Event] | None:
        """The next batch; None at the events' end, or once the process is shutting down (`due`)."""
        if self.due:
            return None
        self.waiting = True
        try:
            return await anext(batches)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            # Ours (due came during this wait; before it, the wait would not have begun): withdrawn, and the
            # answer ends. Any other cancel (the client gone, uvicorn's) propagates.
            if not self.due or self.task is None or self.task.uncancel() > 0:
                raise
            return None
        finally:
            self.waiting = False


def shutdown_chunk(request_id: str) -> LastChunk:
    """The end of a streamed answer cut by the API process's shutdown: an error object (the shape of a
    stream that ended early) and `[DONE]`; the request runs on, readable at its events URL."""
    message = f"the API process is shutting down; the request runs on: read it at /v1/requests/{request_id}/events"
    return LastChunk(b"data: " + orjson.dumps(openai_error(503, "unavailable", message)) + b"\n\n" + DONE)


async def sse_chunks(svc: Services, completion: Completion, held: list[list[Event]], stream: EventStream,
                     batches: AsyncIterator[list[Event]], watch: KeyWatch | None) -> AsyncIterator[bytes]:
    """The streamed answer: the batches `first_news` held, then the rest; it ends when its key is revoked
    or expires (api/key_watch.py), with an error object, so that the SDK raises. The same when the events
    end without the terminal one (the log trimmed past a reader that fell behind): not a truncated answer
    the SDK would take as whole; and when the API process starts shutting down (ShutdownEnd)."""
    end = ShutdownEnd()
    DRAIN.add(end)
    # aclosing: the events are left at their end (the return below), and closed here, at once, rather than
    # by the garbage collector's finalizer (a task and a loop wake-up per request, and the hub left later)
    try:
        with svc.stream_open():
            async with aclosing(batches):
                # a key revoked or expired while the request waited for its first token: none of what it held
                if watch is not None and watch.due() and await watch.ended():
                    yield LastChunk(b"data: " + orjson.dumps(KEY_ENDED) + b"\n\n" + DONE)
                    return
                for batch in held:
                    chunk = sse_chunk(completion, batch)
                    if chunk is not None:
                        yield chunk
                    if isinstance(chunk, LastChunk):
                        return
                while (batch := await end.next(batches)) is not None:
                    if watch is not None and watch.due() and await watch.ended():
                        yield LastChunk(b"data: " + orjson.dumps(KEY_ENDED) + b"\n\n" + DONE)
                        return
                    chunk = sse_chunk(completion, batch)
                    if chunk is not None:
                        yield chunk
                    if isinstance(chunk, LastChunk):
                        return
                if end.due:
                    yield shutdown_chunk(str(stream.request_id))
                    return
                gap = f" ({stream.expired})" if stream.expired is not None else ""
                message = f"the event stream ended early{gap}; read it at /v1/requests/{stream.request_id}/events"
                yield LastChunk(b"data: " + orjson.dumps(openai_error(503, "unavailable", message)) + b"\n\n" + DONE)
    finally:
        DRAIN.discard(end)
        end.close()


def sse_chunk(completion: Completion, batch: list[Event]) -> bytes | None:
    """One batch's bytes: a ping when idle, a LastChunk when it holds the request's terminal event, None
    when none of its events is for the client (e.g. `started`)."""
    if not batch:
        return PING
    out = []
    for event in batch:
        if event.name == "token":
            out.append(completion.chunk(orjson.loads(event.data)))
        elif event.name == "done":
            out.append(completion.final_chunks(orjson.loads(event.data)))
        elif event.terminal:
            out.append(b"data: " + orjson.dumps(openai_error(*failure(event))) + b"\n\n" + DONE)
    if batch[-1].terminal:  # the stream's end goes out with it
        return LastChunk(b"".join(out))
    return b"".join(out) or None


async def whole_answer(request: Request, new: NewRequest, completion: Completion, headers: dict[str, str],
                       batches: AsyncIterator[list[Event]], watch: KeyWatch | None) -> JSON:
    """The non-streamed answer once the request has ended: its `chat.completion` (200), or its failure's
    status and OpenAI error object; a 401 once its key is revoked or expires (api/key_watch.py), as a
    stream ends. While it waits, each idle ping looks whether the client is still there: once it has
    gone, the answer is dropped (the request runs on, readable at its events URL)."""
    async for batch in batches:
        if watch is not None and watch.due() and await watch.ended():
            return JSON(KEY_ENDED, status_code=401, headers={**headers, **NO_RETRY})
        if not batch:
            if await request.is_disconnected():
                break
            continue
        for event in batch:
            if event.name == "token":
                completion.add(orjson.loads(event.data))
            elif event.name == "done":
                return JSON(completion.message(orjson.loads(event.data)), headers=headers)
            elif event.terminal:
                return stored_failure(*failure(event), headers)
    message = f"the event stream ended early; read it at /v1/requests/{new.request_id}/events"
    return stored_failure(503, "unavailable", message, headers)


async def chat_body(request: Request) -> ChatBody:
    """The body, validated here rather than by FastAPI's body and dependency machinery (measured: about
    a fifth of this route's CPU before the submit, on the path of every first token). Errors go
    through the same 422 handler as everywhere else; a body that is not JSON by its content type is a 415."""
    await require_json(request)
    try:
        return ChatBody.model_validate_json(await request.body())
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None
    except ClientDisconnect:  # gone mid-body, or cut off by the body size limit (which answered 413)
        raise ApiError(400, "the client disconnected before sending the whole body") from None


# The body as FastAPI would document it (Message is a component already, through SubmitBody).
CHAT_SCHEMA = ChatBody.model_json_schema(ref_template="#/components/schemas/{model}")
CHAT_SCHEMA.pop("$defs", None)


@router.post("/v1/chat/completions", openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": CHAT_SCHEMA}}}},
    responses={200: {"description": "A chat.completion, or chat.completion.chunk events when `stream` is true",
                     "content": {"application/json": {}, "text/event-stream": {}}}})
async def chat_completions(request: Request):
    who = await principal(request)  # before the body: an unauthenticated caller learns nothing from it
    body = await chat_body(request)
    svc = services(request)
    new = await new_request(body, request, who)
    callback = check_callback(svc, request.headers.get("x-callback-url"))  # push mode (api/callbacks.py)
    await check_group(svc, new.group)  # an unknown X-Group is its 404, never max_streams' retryable 429
    release = None
    if body.stream:
        # A stream is counted before the submit, so a tenant over max_streams stores nothing (429). What can never
        # be admitted is its 403 at any count, not a 429 the client retries: a priority above max_priority
        # (checked first, cached), and a session of another tenant (read on the 429's way only).
        await svc.guardrails.check_priority(who, new.priority)
        try:
            release = await svc.guardrails.open_stream(who)
        except ApiError:
            await check_session_owner(svc, submit_owner(svc, who, new), new.session_id)
            raise
    # A session this process already follows (a client that names its session): joined before the
    # submit, the request's events all come live and the stream reads no log.
    joined = svc.hub.join_live(new.session_id)

    def closed() -> None:
        """Once the answer ends, however (its body may never run: the client gone before the headers)."""
        if joined is not None:
            svc.hub.leave(new.session_id, joined)
        if release is not None:
            release()

    try:
        budget_at = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"  # the one used
        first = int((await submit_request(request, who, new, callback, params_at="",
                                          max_tokens_at=budget_at))["first_event_id"])
    except BaseException:
        closed()
        raise
    # Stored from here on: the store failing is the stored request's 503 with NO_RETRY (store_lost). The status
    # waits past the response deadline (whose 503 the SDK retries): streamed, for the first event that tells how
    # it goes (first_news); not streamed, for the request's end (whole_answer). So a request refused or failed
    # then gets its own status, which OpenAI's SDKs raise as their own classes. attach_callback bounds its wait.
    # A shutdown meanwhile ends the wait at once with the stored request's 503 (DRAIN.unless_shutdown, shutting_down).
    lift_response_deadline(request.scope)
    headers = {"X-Request-Id": new.request_id, "X-Session-Id": new.session_id}
    try:
        await attach_callback(svc, new.request_id, callback)
    except BaseException as error:
        closed()
        if isinstance(error, Exception) and store_unavailable(error):
            return store_lost(error, new, headers, callback_unsure=True)
        raise
    options = (body.model_extra or {}).get("stream_options")
    completion = Completion(new, body.model or new.group,
                            include_usage=isinstance(options, dict) and bool(options.get("include_usage")))
    stream = request_event_stream(svc, new, first=first, joined=joined)
    if body.stream:
        batches = stream.batches()
        watch = key_watch(svc.keyring, who)  # from now: the wait for the first token counts towards its checks

        def stream_closed() -> None:
            stream.close()  # its reader left at once, even when the body never runs (idempotent)
            closed()

        try:
            news, drained = await DRAIN.unless_shutdown(first_news(batches))
        except BaseException as error:
            await batches.aclose()
            stream_closed()
            if isinstance(error, Exception) and store_unavailable(error):
                return store_lost(error, new, headers)
            raise
        if news is None or drained:
            await batches.aclose()
            stream_closed()
            return shutting_down(new, headers)
        held, ended = news
        if ended is not None and ended.name != "done":
            await batches.aclose()
            stream_closed()
            return stored_failure(*failure(ended), headers)
        return EventStreamResponse(sse_chunks(svc, completion, held, stream, batches, watch),
                                   headers={**headers, **SSE_HEADERS}, on_close=stream_closed)  # nginx: no buffering
    try:
        async with aclosing(stream.batches()) as batches:
            answer, drained = await DRAIN.unless_shutdown(
                whole_answer(request, new, completion, headers, batches, key_watch(svc.keyring, who)))
        return shutting_down(new, headers) if answer is None or drained else answer
    except Exception as error:
        if store_unavailable(error):
            return store_lost(error, new, headers)
        # The request is stored (and may have run to its end): a plain 500 would have the SDK retry it, a
        # second request generated again. Its failure, with its ids and no retry.
        log.exception("the answer of %s could not be assembled", new.request_id)
        return stored_failure(502, "generation_failed", f"the answer could not be assembled ({type(error).__name__}); "
                              f"read the request at /v1/requests/{new.request_id}/events", headers)
    finally:
        stream.close()  # its reader left at once (idempotent)
        closed()
