"""A scripted fake OpenAI-compatible backend for tests, and a recorder of what it was asked.

Serve it with `tests.openai_helpers.ServerThread` (or `FakeBackend.serve()`, which also releases
streams that would otherwise never end before stopping the server):

    fake = FakeBackend(models=["m"], default=Script.text("Hel", "lo"))
    with fake.serve() as server:            # server.url == "http://127.0.0.1:PORT/v1"
        fake.push(Script(deltas=[...], finish_reason="tool_calls"))   # the next request's answer
        ...
        record = fake.wait_for_requests(1)[0]   # body, arrival, first chunk, client close

What it serves:
- `GET /v1/models`: the configured model ids.
- `POST /v1/chat/completions`, streamed (`data: {chat.completion.chunk}` lines, then `data: [DONE]`)
  or not (one `chat.completion`). The answer is a `Script`: the next one pushed with `push` (FIFO),
  else what `FakeBackend.choose(body)` returns (when set and not None), else `default`.
- Each script delta is one chunk and one token (`{"content": "Hel"}`, `{"tool_calls": [...]}`, ...);
  the first chunk also carries `"role": "assistant"`. `max_tokens` / `max_completion_tokens` is
  honoured like a real server: more chunks than that are cut to that many, with finish_reason `length`.
- Usage: `Script.usage` is reported as given (None: no usage at all); the default (`AUTO`) is
  `{"prompt_tokens": Script.prompt_tokens, "completion_tokens": <chunks sent>, "total_tokens"}`.
  With `stream_options.include_usage` it comes as a last chunk with `choices: []` (as OpenAI sends it),
  otherwise on the final chunk.
- Logprobs (`Script.logprobs`, one OpenAI logprobs object or None per chunk) are sent only when the
  request asks (`"logprobs": true`), as OpenAI does; otherwise `"logprobs": null`.
- Greedy continuation like vLLM: `continue_final_message: true` with a final assistant message whose
  content is the concatenation of the script's first k chunk contents sends only the chunks after
  them; usage then counts those k chunks as prompt tokens (prompt_tokens + k, completion = chunks
  sent). A prefix that is not made of whole leading chunks is a 400 (the test sent the wrong text).
- Faults: `error_status` (an OpenAI error body instead of a stream), `cut_after` (the connection
  drops after N chunks: no final chunk, no `[DONE]`), `stall_after` (after N chunks nothing but
  keep-alive comments, forever; `stall_after=0` never sends a token), `first_token_delay`,
  `chunk_delay`, and `keepalive` (an SSE comment `: keep-alive` every so many seconds of silence).

`sluicegate_in_front(fake, redis_url, **settings)` serves the fake and starts an in-process Sluicegate
stack (API, scheduler, workers whose `openai` engine streams from it) for the end-to-end tests.

The recorder keeps, per chat request, the parsed body, headers and `time.monotonic()` stamps of its
arrival, first chunk, end, and the client's disconnect (watched concurrently with every sleep and
send, from the ASGI `http.disconnect` message; the stream stops at once). It is read from the test
thread while the server thread writes it: records are appended under a lock and their fields are
plain values assigned once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.openai_helpers import ServerThread

AUTO: Any = "auto"  # Script.usage: computed from the script's prompt_tokens and the chunks sent
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
POLL = 0.05  # how often a wait looks at FakeBackend.close()


@dataclass
class Script:
    """What one chat request gets. Every delta is one chunk (and one token)."""

    deltas: list[dict[str, Any]] = field(default_factory=lambda: [{"content": "Hello"}, {"content": " world"}])
    logprobs: list[dict[str, Any] | None] | None = None  # per chunk, OpenAI shape {"content": [...]}
    finish_reason: str = "stop"  # stop | length | tool_calls | content_filter
    usage: dict[str, int] | None | str = AUTO
    prompt_tokens: int = 7  # for AUTO usage
    first_token_delay: float = 0.0
    chunk_delay: float = 0.0
    keepalive: float | None = None  # seconds of silence between keep-alive comments (None: never)
    stall_after: int | None = None  # after this many chunks: only keep-alive comments, forever
    cut_after: int | None = None  # drop the connection after this many chunks (no final chunk, no [DONE])
    error_status: int | None = None  # answer this status with an OpenAI error body instead
    error_message: str = "scripted failure"
    error_type: str = "server_error"
    honor_max_tokens: bool = True

    @classmethod
    def text(cls, *pieces: str, **options: Any) -> Script:
        """A script of content chunks, one per piece."""
        return cls(deltas=[{"content": p} for p in pieces], **options)

    @property
    def content(self) -> str:
        return "".join(d.get("content") or "" for d in self.deltas)


@dataclass
class Record:
    """One chat request as the fake saw it (times are `time.monotonic()` in this process)."""

    body: dict[str, Any] = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    arrived_at: float
    script: Script | None = field(default=None, repr=False)
    status: int = 200
    first_chunk_at: float | None = None  # the first data chunk (keep-alive comments are not chunks)
    ended_at: float | None = None  # the fake stopped sending (completed, cut, stalled out or client gone)
    closed_at: float | None = None  # the client closed the connection before the answer was complete
    chunks_sent: int = 0  # scripted chunks sent (not the final chunk, usage chunk, comments)
    keepalives_sent: int = 0
    prefix_chunks: int = 0  # continuation: script chunks the final assistant message already held
    outcome: str = ""  # complete | cut | disconnected | error | closed (FakeBackend.close)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def continued(self) -> bool:
        return bool(self.body.get("continue_final_message"))


class BadRequest(Exception):
    pass


def error_body(status: int, message: str, type_: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": status}})


def merge_tool_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call deltas assembled by index, as a client accumulates them."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for part in delta.get("tool_calls") or ():
            call = calls.setdefault(int(part.get("index", 0)),
                                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if part.get("id"):
                call["id"] = part["id"]
            if part.get("type"):
                call["type"] = part["type"]
            function = part.get("function") or {}
            if function.get("name"):
                call["function"]["name"] += function["name"]
            if function.get("arguments"):
                call["function"]["arguments"] += function["arguments"]
    return [calls[i] for i in sorted(calls)]


@dataclass
class Plan:
    """A script applied to one request: which chunks, what to report."""

    script: Script
    completion_id: str
    model: str
    created: int
    chunks: list[dict[str, Any]]  # the deltas to send
    logprobs: list[dict[str, Any] | None] | None
    finish_reason: str
    prefix_chunks: int
    include_usage: bool

    def usage(self, sent: int) -> dict[str, int] | None:
        script = self.script
        if script.usage is None:
            return None
        if isinstance(script.usage, dict):
            if not self.prefix_chunks:
                return dict(script.usage)
            prompt = int(script.usage.get("prompt_tokens", script.prompt_tokens)) + self.prefix_chunks
        else:
            prompt = script.prompt_tokens + self.prefix_chunks
        return {"prompt_tokens": prompt, "completion_tokens": sent, "total_tokens": prompt + sent}


def plan_of(script: Script, body: dict[str, Any], model: str, serial: int) -> Plan:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages: a non-empty list of message objects is required")
    chunks = list(script.deltas)
    logprobs = list(script.logprobs) if script.logprobs is not None else None
    prefix_chunks = 0
    if body.get("continue_final_message") and messages[-1].get("role") == "assistant":
        prefix = str(messages[-1].get("content") or "")
        so_far = ""
        while len(so_far) < len(prefix) and prefix_chunks < len(chunks):
            so_far += chunks[prefix_chunks].get("content") or ""
            prefix_chunks += 1
        if so_far != prefix:
            raise BadRequest(f"continue_final_message: {prefix!r} is not a prefix of whole chunks of the script "
                             f"({script.content!r})")
        chunks = chunks[prefix_chunks:]
        logprobs = logprobs[prefix_chunks:] if logprobs is not None else None
    finish_reason = script.finish_reason
    limit = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BadRequest("max_tokens: a positive integer is required")
    if script.honor_max_tokens and limit is not None and len(chunks) > limit:
        chunks, finish_reason = chunks[:limit], "length"
        logprobs = logprobs[:limit] if logprobs is not None else None
    if not body.get("logprobs"):
        logprobs = None
    options = body.get("stream_options")
    return Plan(script=script, completion_id=f"chatcmpl-fake{serial}", model=str(body.get("model") or model),
                created=int(time.time()), chunks=chunks, logprobs=logprobs, finish_reason=finish_reason,
                prefix_chunks=prefix_chunks,
                include_usage=isinstance(options, dict) and bool(options.get("include_usage")))


class ScriptedStream:
    """The streamed answer to one request, as a raw ASGI response watching for the client's disconnect."""

    def __init__(self, fake: FakeBackend, plan: Plan, record: Record) -> None:
        self.fake = fake
        self.plan = plan
        self.record = record
        self.gone: asyncio.Future[Any] | None = None
        self.last_sent = 0.0
        self.completing = False  # the last send is under way: a disconnect message now is not the client's

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        p = self.plan
        chunk = {"id": p.completion_id, "object": "chat.completion.chunk", "created": p.created, "model": p.model,
                 "choices": choices, **extra}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def _send(self, send: Send, body: bytes, *, more: bool = True) -> bool:
        """Send unless the client is gone; False when it is."""
        if self._client_gone():
            return False
        await send({"type": "http.response.body", "body": body, "more_body": more})
        self.last_sent = time.monotonic()
        return True

    def _client_gone(self) -> bool:
        assert self.gone is not None
        return self.gone.done()

    async def _wait(self, send: Send, seconds: float | None) -> bool:
        """Sleep `seconds` (None: forever), sending keep-alive comments while silent.
        False when the client left (or the fake is closing) meanwhile."""
        assert self.gone is not None
        keepalive = self.plan.script.keepalive
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return not self._client_gone()
            if self.fake.closing:
                self.record.outcome = "closed"
                return False
            step = POLL if deadline is None else min(POLL, deadline - now)
            if keepalive is not None:
                next_ping = self.last_sent + keepalive
                if now >= next_ping:
                    if not await self._send(send, KEEPALIVE):
                        return False
                    self.record.keepalives_sent += 1
                    continue
                step = min(step, next_ping - now)
            await asyncio.wait({self.gone}, timeout=max(step, 0))
            if self._client_gone():
                return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record, plan, script = self.record, self.plan, self.plan.script

        async def watch() -> Any:  # the body is read: the next message is the disconnect
            message = await receive()
            if not self.completing:  # (uvicorn also wakes it once the response is complete)
                record.closed_at = time.monotonic()
            return message

        self.gone = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            self.last_sent = time.monotonic()
            for k, delta in enumerate(plan.chunks):
                if script.stall_after is not None and k >= script.stall_after:
                    await self._wait(send, None)
                    return
                if script.cut_after is not None and k >= script.cut_after:
                    record.outcome = "cut"
                    return  # uvicorn drops the connection: the response never completed
                delay = script.first_token_delay if k == 0 else script.chunk_delay
                if delay > 0 and not await self._wait(send, delay):
                    return
                choice: dict[str, Any] = {"index": 0, "delta": {"role": "assistant", **delta} if k == 0 else delta,
                                          "logprobs": plan.logprobs[k] if plan.logprobs is not None else None,
                                          "finish_reason": None}
                if not await self._send(send, self._chunk([choice])):
                    return
                record.chunks_sent += 1
                if record.first_chunk_at is None:
                    record.first_chunk_at = self.last_sent
            if script.stall_after is not None and len(plan.chunks) >= script.stall_after:
                await self._wait(send, None)
                return
            if script.cut_after is not None and len(plan.chunks) >= script.cut_after:
                record.outcome = "cut"
                return
            usage = plan.usage(record.chunks_sent)
            final = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": plan.finish_reason}
            tail = self._chunk([final], **({"usage": usage} if usage is not None and not plan.include_usage else {}))
            if usage is not None and plan.include_usage:
                tail += self._chunk([], usage=usage)
            self.completing = True
            if await self._send(send, tail + DONE, more=False):
                record.outcome = "complete"
        finally:
            if self._client_gone() and not record.outcome:
                record.outcome = "disconnected"
            record.ended_at = time.monotonic()
            self.gone.cancel()


class FakeBackend:
    """The app, its scripts and its recorder. `app` is the ASGI app; `serve()` runs it on a free port."""

    def __init__(self, models: list[str] | None = None, default: Script | None = None,
                 choose: Callable[[dict[str, Any]], Script | None] | None = None) -> None:
        self.models = list(models or ["fake-model"])
        self.default = default or Script()
        self.choose = choose
        self.closing = False
        self.models_calls = 0
        self._scripts: deque[Script] = deque()
        self._records: list[Record] = []
        self._changed = threading.Condition()
        self._serial = itertools.count(1)
        self.app = Starlette(routes=[Route("/v1/models", self._models, methods=["GET"]),
                                     Route("/v1/chat/completions", self._chat, methods=["POST"])])

    # ---- scripting -----------------------------------------------------------------------------
    def push(self, *scripts: Script) -> FakeBackend:
        """Scripts for the next requests, in order (before `choose` and `default`)."""
        with self._changed:
            self._scripts.extend(scripts)
        return self

    def _script_for(self, body: dict[str, Any]) -> Script:
        with self._changed:
            if self._scripts:
                return self._scripts.popleft()
        if self.choose is not None:
            chosen = self.choose(body)
            if chosen is not None:
                return chosen
        return self.default

    # ---- recorder ------------------------------------------------------------------------------
    @property
    def records(self) -> list[Record]:
        with self._changed:
            return list(self._records)

    def wait_for_requests(self, count: int, timeout: float = 20) -> list[Record]:
        """The first `count` records, waiting for them to arrive."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._records) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the fake got {len(self._records)} chat requests, expected {count}")
                self._changed.wait(min(left, 0.5))
            return list(self._records[:count])

    def wait_until(self, predicate: Callable[[list[Record]], Any], timeout: float = 20,
                   what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.records)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; records: {self.records}")
            time.sleep(0.005)

    def _note(self, record: Record) -> None:
        with self._changed:
            self._records.append(record)
            self._changed.notify_all()

    # ---- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """End every endless stream (stalled ones) so that the server can stop."""
        self.closing = True

    @contextlib.contextmanager
    def serve(self, port: int | None = None) -> Iterator[ServerThread]:
        server = ServerThread(self.app, port=port).start()
        try:
            yield server
        finally:
            self.close()
            server.stop()

    # ---- routes --------------------------------------------------------------------------------
    async def _models(self, _: Request) -> Response:
        self.models_calls += 1
        listing = {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                                              for m in self.models]}
        return Response(orjson.dumps(listing), media_type="application/json")

    async def _chat(self, request: Request) -> Response | ScriptedStream:
        arrived = time.monotonic()
        raw = await request.body()
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
        except (orjson.JSONDecodeError, BadRequest) as error:
            self._note(Record(body={"_raw": raw.decode(errors="replace")}, headers=dict(request.headers),
                              arrived_at=arrived, status=400, outcome="error", ended_at=time.monotonic()))
            return Response(error_body(400, str(error), "invalid_request_error"), status_code=400,
                            media_type="application/json")
        record = Record(body=body, headers=dict(request.headers), arrived_at=arrived)
        script = record.script = self._script_for(body)
        self._note(record)  # visible at once (a hung non-streamed request too)
        try:
            if script.error_status is not None:
                record.status, record.outcome = script.error_status, "error"
                return Response(error_body(script.error_status, script.error_message, script.error_type),
                                status_code=script.error_status, media_type="application/json")
            try:
                plan = plan_of(script, body, self.models[0], next(self._serial))
            except BadRequest as error:
                record.status, record.outcome = 400, "error"
                return Response(error_body(400, str(error), "invalid_request_error"), status_code=400,
                                media_type="application/json")
            record.prefix_chunks = plan.prefix_chunks
            if body.get("stream"):
                return ScriptedStream(self, plan, record)
            return await self._complete(request, plan, record)
        finally:
            if record.outcome == "error":
                record.ended_at = time.monotonic()

    async def _complete(self, request: Request, plan: Plan, record: Record) -> Response:
        """The non-streamed answer, after the same delays as the stream would take."""
        script = plan.script
        gone = asyncio.ensure_future(request.receive())

        async def sleep(seconds: float | None) -> bool:
            deadline = None if seconds is None else time.monotonic() + seconds
            while deadline is None or time.monotonic() < deadline:
                if self.closing:
                    return False
                step = POLL if deadline is None else min(POLL, deadline - time.monotonic())
                await asyncio.wait({gone}, timeout=max(step, 0))
                if gone.done():
                    record.closed_at = time.monotonic()
                    return False
            return True

        try:
            count = len(plan.chunks)
            if script.stall_after is not None and script.stall_after <= count:
                await sleep(None)
                record.outcome = record.outcome or ("disconnected" if record.closed_at else "closed")
                return Response(b"", status_code=504)
            delay = script.first_token_delay + script.chunk_delay * max(0, count - 1)
            if delay > 0 and not await sleep(delay):
                record.outcome = "disconnected" if record.closed_at else "closed"
                return Response(b"", status_code=504)
            record.chunks_sent = count
            record.first_chunk_at = time.monotonic()
            message: dict[str, Any] = {"role": "assistant",
                                       "content": "".join(d.get("content") or "" for d in plan.chunks) or None}
            tool_calls = merge_tool_calls(plan.chunks)
            if tool_calls:
                message["tool_calls"] = tool_calls
            logprobs = None
            if plan.logprobs is not None:
                logprobs = {"content": [item for lp in plan.logprobs if lp for item in lp.get("content") or ()]}
            answer: dict[str, Any] = {
                "id": plan.completion_id, "object": "chat.completion", "created": plan.created, "model": plan.model,
                "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                             "finish_reason": plan.finish_reason}]}
            usage = plan.usage(count)
            if usage is not None:
                answer["usage"] = usage
            record.outcome = "complete"
            return Response(orjson.dumps(answer), media_type="application/json")
        finally:
            gone.cancel()
            record.ended_at = time.monotonic()


# ---- Sluicegate in front of the fake ------------------------------------------------------------
@contextlib.contextmanager
def sluicegate_in_front(fake: FakeBackend, redis_url: str, *, workers: int = 1,
                        **overrides: Any) -> Iterator[tuple[Any, ServerThread]]:
    """The fake on a free port, and an in-process Sluicegate stack (API, scheduler, `workers` workers
    of group `default` whose `openai` engine, made from the settings, streams from it). Settings
    default to one try per backend call (`backend_retries=1`), the worker declaring the fake's first
    model, and resumes by continuation (`backend_continue="yes"`: the fake continues as vLLM does, and
    the probe, off in tests, would not say so); `overrides` change any of them. Yields (stack, fake's
    server)."""
    from tests.helpers import Stack, fast_settings

    with fake.serve() as server:
        settings = fast_settings(redis_url, **{"engine": "openai", "backend_url": server.url,
                                               "backend_model": fake.models[0], "backend_retries": 1,
                                               "backend_continue": "yes", **overrides})
        stack = Stack(settings).start(workers=workers)
        try:
            yield stack, server
        finally:
            fake.close()  # stalled streams end, so that the workers' calls return
            stack.stop()
