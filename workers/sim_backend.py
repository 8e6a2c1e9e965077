"""`sluicegate sim-backend`: an OpenAI-compatible server that generates the sim engine's tokens.

It is the baseline of the TTFT-overhead benchmarks (a direct call to it against the same call through
Sluicegate) and the backend of the openai engine's tests, so it stays lean: one small Starlette app,
every chunk byte-assembled from pre-encoded parts, no per-request work beyond parsing the body and
hashing the prompt.

What it serves:
- `GET /v1/models`: one model (`sim` unless told otherwise); any model name is accepted on requests.
- `POST /v1/chat/completions`: exactly `max_tokens` (or `max_completion_tokens`) tokens, finish_reason
  `length`, the same text as the sim engine for the same messages (`prompt_of` + `sim_token`), paced
  at `tokens_per_second` after `prefill_ms`. Streamed: `data: {chat.completion.chunk}` per token (the
  first one also carries the role), a final chunk with an empty delta and the finish_reason, then
  `data: [DONE]`; the usage comes only with `stream_options.include_usage`, in a last chunk with no
  choices, as vLLM and OpenAI send it (a stream that did not ask has none, so a client's no-usage path
  meets here what it meets there). Not streamed: one `chat.completion` with usage.
- Continuation (vLLM's `continue_final_message: true` with a final assistant message): the output
  continues at index = the number of sim tokens already in that message, seeded by the messages
  before it, so the text so far plus the continuation equals the uninterrupted output. As vLLM
  does, the usage counts the output so far as prompt (one token per sim token).

Failure injection (tests only) is an explicit option of `create_sim_backend`, per app, never global.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sluicegate.sessions.requests import estimate_tokens
from sluicegate.settings import Settings
from sluicegate.workers.engines.sim import WORDS, paced_tokens, prompt_of, prompt_seed

DEFAULT_MAX_TOKENS = 256
ENCODED = {word + " ": orjson.dumps(word + " ") for word in WORDS}  # token text -> its JSON string
CHUNK_TAIL = b'},"finish_reason":null}]}\n\n'
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass
class Faults:
    """Failure injection for tests; counts are per app instance.

    fail_first: the first N chat requests get `fail_status` (an OpenAI-style error body).
    break_streams: the first N streamed requests lose their connection after `break_after` tokens
      (no final chunk, no `[DONE]`: the client sees a truncated stream).
    reject_priority: a non-zero `priority` gets 400, as vLLM answers without `--scheduling-policy priority`.
    reject_max_tokens: `max_tokens` gets 400 naming `max_completion_tokens`, as OpenAI's reasoning models answer.
    """

    fail_first: int = 0
    fail_status: int = 503
    break_streams: int = 0
    break_after: int = 1
    reject_priority: bool = False
    reject_max_tokens: bool = False
    requests: int = 0
    broken: int = 0


@dataclass(frozen=True)
class Plan:
    """One completion: which tokens to generate and how to label them."""

    completion_id: str
    model: str
    created: int
    seed: bytes
    start: int
    count: int
    prompt_tokens: int
    include_usage: bool

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.count,
                "total_tokens": self.prompt_tokens + self.count}


class BadRequest(Exception):
    pass


def error_response(status: int, message: str, type_: str = "invalid_request_error") -> Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def plan_of(body: Any, default_model: str, serial: int) -> Plan:
    """Validate a chat-completions body and decide what to generate."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages: a non-empty list of message objects is required")
    count = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None),
                 DEFAULT_MAX_TOKENS)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise BadRequest("max_tokens: a positive integer is required")
    start, seeded_by = 0, messages
    if body.get("continue_final_message") and messages[-1].get("role") == "assistant":
        start = len(str(messages[-1].get("content") or "").split())  # the output so far is sim tokens "word "
        seeded_by = messages[:-1]
    options = body.get("stream_options")
    return Plan(completion_id=f"chatcmpl-sim{serial}", model=str(body.get("model") or default_model),
                created=int(time.time()), seed=prompt_seed(prompt_of(seeded_by)), start=start, count=count,
                prompt_tokens=estimate_tokens(prompt_of(seeded_by)) + start,  # the output so far counts as prompt
                include_usage=isinstance(options, dict) and bool(options.get("include_usage")))


class TokenStream:
    """The streamed answer, written straight to ASGI `send` (no per-chunk JSON encoding)."""

    def __init__(self, plan: Plan, *, tokens_per_second: float, prefill_ms: float, break_after: int | None) -> None:
        self.plan = plan
        self.tokens_per_second = tokens_per_second
        self.prefill_ms = prefill_ms
        self.break_after = break_after

    def _head(self, *, first: bool) -> bytes:
        p = self.plan
        delta = b'{"role":"assistant","content":' if first else b'{"content":'
        return (b'data: {"id":"' + p.completion_id.encode() + b'","object":"chat.completion.chunk","created":'
                + str(p.created).encode() + b',"model":' + orjson.dumps(p.model)
                + b',"choices":[{"index":0,"delta":' + delta)

    def _tail_chunks(self) -> bytes:
        p = self.plan
        base = {"id": p.completion_id, "object": "chat.completion.chunk", "created": p.created, "model": p.model}
        final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
        out = b"data: " + orjson.dumps(final) + b"\n\n"
        if p.include_usage:
            out += b"data: " + orjson.dumps({**base, "choices": [], "usage": p.usage()}) + b"\n\n"
        return out + DONE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        gone = asyncio.ensure_future(receive())  # the body is read: the next message is the disconnect
        try:
            head, first_head = self._head(first=False), self._head(first=True)
            sent = 0
            p = self.plan
            async for token in paced_tokens(p.seed, p.start, p.start + p.count,
                                            tokens_per_second=self.tokens_per_second, prefill_ms=self.prefill_ms):
                if gone.done() or sent == self.break_after:
                    return  # client gone, or an injected break: uvicorn closes the connection mid-stream
                body = (first_head if sent == 0 else head) + ENCODED[token] + CHUNK_TAIL
                await send({"type": "http.response.body", "body": body, "more_body": True})
                sent += 1
            await send({"type": "http.response.body", "body": self._tail_chunks(), "more_body": False})
        finally:
            gone.cancel()


def completion_body(plan: Plan, text: str) -> bytes:
    return orjson.dumps({
        "id": plan.completion_id, "object": "chat.completion", "created": plan.created, "model": plan.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
        "usage": plan.usage()})


def create_sim_backend(tokens_per_second: float = 50.0, prefill_ms: float = 20.0, *, model: str = "sim",
                       faults: Faults | None = None) -> Starlette:
    """The sim-backend app; `faults` injects failures (tests), see `Faults`."""
    faults = faults or Faults()
    served = {"object": "list", "data": [{"id": model, "object": "model", "created": int(time.time()),
                                          "owned_by": "sluicegate"}]}
    models_body = orjson.dumps(served)

    async def models(_: Request) -> Response:
        return Response(models_body, media_type="application/json")

    async def chat_completions(request: Request) -> Response | TokenStream:
        faults.requests += 1
        if faults.requests <= faults.fail_first:
            return error_response(faults.fail_status, f"injected failure {faults.requests}/{faults.fail_first}",
                                  "server_error")
        try:
            body = orjson.loads(await request.body())
            plan = plan_of(body, model, faults.requests)
            if faults.reject_priority and body.get("priority", 0) != 0:
                raise BadRequest(f"Got priority {body['priority']} but Priority scheduling is not enabled.")
            if faults.reject_max_tokens and "max_tokens" in body:
                raise BadRequest("Unsupported parameter: 'max_tokens' is not supported with this model. "
                                 "Use 'max_completion_tokens' instead.")
        except (orjson.JSONDecodeError, BadRequest) as error:
            return error_response(400, str(error) or "invalid body")
        if body.get("stream"):
            break_after = None
            if faults.broken < faults.break_streams:
                faults.broken += 1
                break_after = faults.break_after
            return TokenStream(plan, tokens_per_second=tokens_per_second, prefill_ms=prefill_ms,
                               break_after=break_after)
        tokens = [t async for t in paced_tokens(plan.seed, plan.start, plan.start + plan.count,
                                                 tokens_per_second=tokens_per_second, prefill_ms=prefill_ms)]
        return Response(completion_body(plan, "".join(tokens)), media_type="application/json")

    return Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"])])


def run_sim_backend(settings: Settings) -> None:
    """Serve the sim-backend in the foreground (`sluicegate sim-backend`)."""
    import uvicorn

    app = create_sim_backend(settings.sim_tokens_per_second, settings.sim_prefill_ms)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                access_log=False, timeout_graceful_shutdown=5)
