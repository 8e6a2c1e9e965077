"""The `openai` engine: stream a run from any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, Ollama).

The streamed call goes through a lean HTTP/1.1 client of its own (workers/engines/http1.py, kept
connections, 0.4 ms less to the first chunk than aiohttp); the calls off the first token's way
(models, the probe, token counts) share one aiohttp session per worker process. Each chunk with text,
a non-text delta (tool calls) or logprobs is one token of the run (one `token` event, its index the
next); what the chunk carried besides text travels with it (`Token`), and the stream's finish_reason
and usage end it (`Finish`). Usage is asked for with `stream_options.include_usage` (a server that
refuses the field is asked again without it, and not asked again once that call is served: see `_post`).

A server that streams message diffs (llama.cpp) may send several chunks for one generated token (the
end of the text and the start of a tool call; a tool call's name, then its arguments): the backend's
own max_tokens ends its output, and every chunk it sent is kept, with its finish_reason. Only a
backend past its max_tokens is cut here (closing the stream), its run then ending `length`: by its own
count (a server that reports usage in every chunk), or past RUNAWAY_CHUNKS_PER_TOKEN chunks per token
asked (plus RUNAWAY_SLACK). Indices count chunks: a resume by regeneration skips as many chunks (the
same ones under greedy decoding), but stops skipping at a chunk with a non-text delta (what was streamed
before is text only: an output that turned into a tool call sends the call whole, never without its head);
one by continuation asks for max_tokens less the output so far, in tokens (`_output_tokens`: a chunk may
carry several).

Failures, and who handles them:
- before the first token (connection refused, timeout, 408, 429, 5xx, a stream cut short, no token
  within `first_token_timeout`): retried here with tenacity, exponential backoff with full jitter
  (waits drawn from [0, 0.5 s x 2^n], at most 8 s), at most `retries` tries; then the attempt fails
  as a transient EngineError naming the backend and its last error. Other 4xx are permanent at once
  (the request itself is wrong), but for a 404 saying the model learnt from /models (no --backend-model) does
  not exist, from a backend whose /models now lists one other model (one restarted with another): that one is
  learnt and the next try names it. A retried
  status with a `Retry-After` (seconds or an HTTP-date; vLLM, TGI and proxies send it when overloaded) is
  honoured: the next try waits at least that long, but at most RETRY_AFTER_MAX_SECONDS (30 s: a confused
  backend cannot park the slot for hours); one that does not parse or is past leaves the backoff as it is. A
  backend not reached at all on any try (nothing listening, or a 503: one still loading its model) fails the
  attempt as BackendDown (engines/base.py): handed back without counting as a failed attempt, its worker
  withdrawing its slots until its probe answers.
  One that any try reached (a connection closed or cut after the request went out, any other status, an
  error in its stream) fails it as a failed attempt, even when nothing listens on the later tries: a
  backend that died of the request (a poison prompt) is refused afterwards, and must not get it again
  at each restart for free.
- after tokens streamed (a broken stream, silence past `idle_timeout`): a transient EngineError; after
  the backend's finish_reason (only its usage or `[DONE]` missing) the run ends finished instead.
- a chunk that is not one (`choices` neither a list nor null, a `delta` no object, a `content` no text) is a
  broken stream, as bad JSON is (a ValueError): retried before the first token, handed back after it.
- a 200 that is not an event stream (its content-type says so: a JSON error served with 200, a web
  page at a wrong --backend-url): the backend's words, permanent unless its JSON error says otherwise.
- an error the backend reports inside its stream (vLLM's `data: {"error": ...}`, llama.cpp's
  `error: {...}` line, a `data:` after `event: error`): its own words. Before the first token a 4xx
  other than 408 and 429 is permanent, any other is transient as above; TGI tags every such error 422
  (`http_status_code`): its words say which is the request's fault (tgi_status). vLLM tags any failure of
  its stream generator a 400, a dead engine core's included: one whose words name an engine death
  (ENGINE_DEATH) is transient whatever its tag. After the first token it is transient, whatever its tag
  (the backend took the request), and after the finish_reason the run ends finished.
- a finish_reason `abort` (SGLang's graceful abort, vLLM's FinishReason.ABORT) is no answer: the backend
  stopped the generation (a weight update, an engine shutting down), so it fails as a broken stream does.
- a resume by continuation that the backend refuses (a 4xx: the continued call is Sluicegate's, not the
  request the backend took before) is asked again in the same attempt as a regeneration.
A transient failure hands the run back; it resumes, possibly on another worker and backend, from the
tokens so far, until the request has failed `--max-attempts` times. Keep-alive comments are not
activity: a backend that sends only those times out like a silent one.

Resume sends the output so far as a final assistant message with vLLM's `continue_final_message`
(and `add_generation_prompt: false`), asking for the remaining max_tokens less the output so far (and the
tenant's `min_tokens` less it too; its `echo`, which would stream the output so far again, not at all). A
chunk is not always one token (vLLM streams all the tokens a speculative-decoding step accepted in one
chunk, SGLang one chunk per `--stream-interval` tokens), so the output so far is counted with the
backend's own tokenizer where it has one (`/tokenize`: vLLM, SGLang, llama.cpp; `_output_tokens`; the
budget never leaves out fewer than its chunks), and is `start_index` (its chunks) where it has none or the
count fails: there a resumed run can get past max_tokens. The backend then counts the output so far as
prompt: the usage reported is moved back by that count, to what the request would have reported uninterrupted.
Nor does it look for the request's `stop` strings in that prompt: one split by the seam is found here
(workers/engines/stop_seam.py), and the run ends there with finish_reason `stop`, as it would have uninterrupted.

Priority: vLLM schedules lower values first (with `--scheduling-policy priority`), so Sluicegate's
0..9 (higher first) is sent as `priority = 9 - p`; to SGLang, which runs higher values first, as
`p`. A server that rejects the field (vLLM without priority scheduling answers 400 "...Priority
scheduling is not enabled") is asked again without it, and this engine stops sending it once that
call is served (vLLM and SGLang echo the whole request in any validation 400, which then names it too).

Seed: a backend that cannot continue (a resume regenerates) gets a seed derived from the request id when
the caller sent none, so that a regenerated resume repeats the sampled tokens already streamed. One that
refuses it (a 400 naming `seed`: LiteLLM's UnsupportedParamsError for a model without seeds) is asked again
without it, and stops getting it once that call is served, as with `priority`. The caller's own seed goes
as sent: a 400 refusing it is the request's, and the caller's.

A run that is cancelled or preempted closes its HTTP stream at once (the backend aborts the
generation and frees its KV cache).

What the backend can do (priority, continuation, usage in streams, slots) is probed when the worker
starts, and again until it answers when it was not up yet (workers/engines/probe.py). A backend that
cannot continue a partial answer gets the whole request again on a resume, and the tokens already
streamed are skipped (`resume_mode`). A backend whose stream reports no usage but has a tokenize
endpoint gets its output counted with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import replace
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from sluicegate.sessions.idle import IdleDeadline
from sluicegate.sessions.requests import ENGINE_OWNED_PARAMS, PART_TOKENS, message_texts
from sluicegate.sessions.runs import BACKEND_REFUSED_PREFIX, RunSpec
from sluicegate.settings import Settings
from sluicegate.tracing import Tracing, traced_stream, tracing_for
from sluicegate.workers.engines.base import BackendDown, EngineError, Finish, Piece, Token
from sluicegate.workers.engines.http1 import HTTP1Client, HTTPClientError, Response, split_userinfo
from sluicegate.workers.engines.probe import (
    INJECTED_SEED,
    OPTIONAL_FIELDS,
    Capabilities,
    probe,
    refused_field,
    renamed_budget,
    root_of,
)
from sluicegate.workers.engines.stop_seam import StopSeam, stop_strings
from sluicegate.workers.retrying import first_try_then

log = logging.getLogger(__name__)

TEXT_FIELDS = frozenset({"content", "role"})  # what a delta carries that is not passed on raw
RETRIED_STATUSES = frozenset({408, 429})
COUNT_TIMEOUT = 5.0  # seconds for a tokenize-count call; past it the usage is Sluicegate's estimate
# Servers with a `/tokenize` at their root that `_count` can ask (besides those with counts_tokens): vLLM's and
# SGLang's take `prompt` (and `model`), llama.cpp's `content`; each ignores the other's field.
TOKENIZE_SERVERS = frozenset({"vllm", "sglang", "llama.cpp"})
# A backend past its max_tokens is cut: by its own count (usage in every chunk), or past
# RUNAWAY_CHUNKS_PER_TOKEN chunks per token asked, plus RUNAWAY_SLACK (a server streaming message diffs
# sends more chunks than tokens, and must never be cut while it ends by itself).
RUNAWAY_CHUNKS_PER_TOKEN = 2
RUNAWAY_SLACK = 8
MAX_LINE = 2**20  # bytes of one line of a backend's stream (a chunk with logprobs is a few KB)
RETRY_AFTER_MAX_SECONDS = 30.0  # the longest a backend's Retry-After makes a retry wait
DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")
# TGI's words (its InferError) for an error in a chat stream that is the request's own: every such
# error comes tagged 422 (tgi_status), these are the ones no retry fixes.
TGI_REFUSALS = ("Input validation error", "Template error", "Missing template", "Tool error")
TGI_OVERLOADED = "Model is overloaded"
# vLLM's words for an engine that died under the request (EngineDeadError, EngineGenerateError, its V0 loop's
# AsyncEngineDeadError), which it sends tagged 400 like a real refusal: a failure of the backend's, transient.
ENGINE_DEATH = ("enginecore encountered an issue", "engine loop has died", "enginedeaderror", "enginegenerateerror",
                "engine core is dead", "background loop has errored")
UNAVAILABLE = 503  # a backend that is not up (llama.cpp while it loads its model; a proxy with no server behind)
GATEWAY_STATUSES = (502, 504)  # a proxy's own answer: the server behind it did not answer (nginx while it restarts)


class Transient(Exception):
    """A failure worth another attempt; `retry_after`: the seconds the backend asked to wait before it
    (its Retry-After header), if it did; `down`: the backend was not reached at all, or said it is not up (503);
    `gateway`: a proxy answered for it (502, 504), which shows no more than `down` that the backend was reached."""

    def __init__(self, *args: object, retry_after: float | None = None, down: bool = False,
                 gateway: bool = False) -> None:
        super().__init__(*args)
        self.retry_after = retry_after
        self.down = down
        self.gateway = gateway


class Permanent(Exception):
    """A failure no retry can fix."""


def describe(error: BaseException) -> str:
    if isinstance(error, HTTPClientError):  # the lean client's words name no address
        return str(error)
    if isinstance(error, aiohttp.ClientConnectorError):  # the reason only: the address goes to the log
        os_error = error.os_error
        reason = os.strerror(os_error.errno) if os_error.errno else type(os_error).__name__
        return f"cannot connect ({reason})"
    if isinstance(error, TimeoutError):
        return f"timed out ({type(error).__name__})"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "the connection closed in the middle of the response"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def unreachable(error: BaseException) -> bool:
    """Whether a call never reached a server: nothing listening (the lean client's words, or aiohttp's for the
    model listing). A connection closed after the request went out is no such thing (the backend may have
    died of the request: http1.HTTPClientError), nor is a refused certificate (a setting's fault)."""
    if isinstance(error, HTTPClientError):
        return error.unreachable
    if isinstance(error, aiohttp.ClientSSLError):
        return False
    return isinstance(error, aiohttp.ClientConnectorError)


def names_engine_death(message: str) -> bool:
    """Whether an error's words say the backend's engine died under the request (ENGINE_DEATH). Only the words
    before an echoed request (vLLM's validation errors quote it: `'input': ...`), whose prompt may hold any."""
    lowered = message.lower().split("'input':", 1)[0].split('"input":', 1)[0]
    return any(words in lowered for words in ENGINE_DEATH)


def refuses_model(status: int, payload: bytes, model: str) -> bool:
    """Whether an error answer says the backend does not serve `model`: a 404 whose own message (not an echo of
    the request) names it quoted and says it does not exist or is not found (vLLM's NotFoundError "The model `x`
    does not exist.", Ollama's 'model "x" not found'). A 404 about anything else (a wrong path, a gateway's
    route) that merely quotes the name is the request's own failure."""
    if status != 404 or not model:
        return False
    message = error_message(status, payload).lower()
    named = any(f"{quote}{model.lower()}{quote}" in message for quote in ("`", '"', "'"))
    return named and ("does not exist" in message or "not found" in message)


def error_message(status: int, body: bytes) -> str:
    """The backend's own words for an error response, whatever its shape."""
    try:
        data = orjson.loads(body)
        detail = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        text = str(detail)
    except (orjson.JSONDecodeError, AttributeError):
        text = body.decode(errors="replace")
    return f"HTTP {status}: {text.strip()[:300]}"


def stream_error(payload: bytes) -> Exception:
    """A failure the backend reported inside its stream, shaped `{"error": {...}}` (vLLM; TGI's with
    `http_status_code`), `{"code": .., "message": ..}` (llama.cpp's `error:` line) or plain text: the
    backend's words, permanent for a 4xx no retry fixes (the request itself is wrong), else transient."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    code = tgi_words = None
    if isinstance(data, dict):
        detail = data.get("error")
        if isinstance(detail, dict):
            code = detail.get("code")
            if code is None and detail.get("http_status_code") is not None:  # TGI (v3)
                code, tgi_words = detail["http_status_code"], str(detail.get("message", ""))
        code = data.get("code") if code is None else code
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    status = code if isinstance(code, int) and not isinstance(code, bool) else 500
    if tgi_words is not None:
        status = tgi_status(status, tgi_words)
    message = error_message(status, payload)
    if 400 <= status < 500 and status not in RETRIED_STATUSES and not names_engine_death(message):
        return Permanent(message)
    return Transient(message, down=status == UNAVAILABLE)


def tgi_status(tagged: int, message: str) -> int:
    """The status of an error TGI sent inside its chat stream. TGI tags every one of them 422 (its
    into_openai_event), an overload and a failed generation included, so its words tell them apart: a
    request it cannot take (TGI_REFUSALS) stays 422, permanent; an overload is a 429 and anything else a
    500, both transient. Another tag is taken as it is."""
    if tagged != 422:
        return tagged
    if message.startswith(TGI_REFUSALS):
        return 422
    return 429 if message.startswith(TGI_OVERLOADED) else 500


def retry_after_seconds(value: str | None) -> float | None:
    """The seconds a Retry-After header asks to wait (RFC 9110: delta-seconds, here also decimal, or an
    HTTP-date); None for one that is absent, does not parse, or is not in the future."""
    if not value:
        return None
    value = value.strip()
    if DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
            seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return seconds if seconds > 0 else None


def honouring_retry_after(backoff: Callable[[RetryCallState], float],
                          cap: float) -> Callable[[RetryCallState], float]:
    """A tenacity wait: `backoff`, or longer when the failed try's backend said when to come back
    (Transient.retry_after, at most `cap` seconds): sooner only hammers an overloaded server and burns
    the tries; the cap keeps a confused backend from parking the slot for hours."""
    def wait(retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        asked = error.retry_after if isinstance(error, Transient) else None
        own = backoff(retry_state)
        return own if asked is None else max(own, min(asked, cap))
    return wait


def usage_over(usage: dict[str, Any] | None, budget: int) -> bool:
    """Whether the backend's own count (a server may report usage in every chunk) says it generated
    more than the `budget` tokens it was asked for."""
    if usage is None:
        return False
    try:
        return int(usage["completion_tokens"]) > budget
    except (KeyError, TypeError, ValueError):
        return False


MAX_USAGE_COUNT = 2**53  # a backend's count at or past it is not believed (the store counts up to 2^63)


def usage_count(value: Any) -> int | None:
    """A backend's token count when it is a whole number in [0, MAX_USAGE_COUNT), else None: a bogus one
    (`"prompt_tokens": 1e20`) would otherwise be charged, or fail the run's end in the store."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if 0 <= value < MAX_USAGE_COUNT else None


def usage_as_uninterrupted(usage: Any, start_index: int) -> dict[str, Any] | None:
    """The backend's usage for a continued run, moved back to the whole request: the output so far
    (`start_index` tokens) was sent as prompt, and is output. None (Sluicegate counts) when it has no
    believable counts (usage_count)."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage_count(usage.get("prompt_tokens")), usage_count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    moved = min(start_index, prompt)
    moved_back = {**usage, "prompt_tokens": prompt - moved, "completion_tokens": completion + moved,
                  "total_tokens": prompt + completion}
    details = usage.get("prompt_tokens_details")
    if moved and isinstance(details, dict):  # counted over the longer prompt: none can exceed the prompt now
        moved_back["prompt_tokens_details"] = {
            k: min(v, prompt - moved) if isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in details.items()}
    return moved_back


async def sse_lines(body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The body's lines (without their newline), split from the pieces the body arrives in: an event
    ("data: ...", then a blank line) usually comes in one piece, which a read per line made two. A line
    cut across reads is kept in pieces, joined once whole (never copied again per read)."""
    pieces: list[bytes] = []  # the unfinished line
    size = 0
    async for data in body:
        *lines, rest = data.split(b"\n")
        if lines:
            if pieces:
                pieces.append(lines[0])
                lines[0] = b"".join(pieces)
                pieces.clear()
                size = 0
            for line in lines:
                yield line
        if rest:
            pieces.append(rest)
            size += len(rest)
            if size > MAX_LINE:  # a broken or hostile backend: never an unbounded buffer
                raise ValueError(f"a line of the backend's stream is over {MAX_LINE} bytes")
    if pieces:
        yield b"".join(pieces)


class StreamState:
    """What one backend stream said besides its tokens."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None


def pieces_of(chunk: dict[str, Any], state: StreamState) -> list[Piece]:
    """The tokens of one chunk (usually one), noting its finish_reason and usage in `state`."""
    if isinstance(chunk.get("usage"), dict):
        state.usage = chunk["usage"]
    out: list[Piece] = []
    choices = chunk.get("choices")
    if not isinstance(choices, list):  # (the one test a chunk pays)
        if choices is not None:  # a broken backend's, like bad JSON: retried, not a worker error
            raise ValueError(f"the stream sent a chunk whose choices are not a list: {str(choices)[:100]}")
        choices = ()
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue  # n = 1: only the first choice is ours
        if choice.get("finish_reason") == "abort":  # the backend stopped it (SGLang, vLLM): no answer, retried
            raise Transient("the backend aborted the generation (finish_reason abort)")
        delta = choice.get("delta") or {}
        text = (delta.get("content") or "") if isinstance(delta, dict) else None
        if not isinstance(text, str):  # a broken backend's, like bad JSON: retried, not a worker error
            raise ValueError(f"the stream sent a chunk whose delta or content is not text: "
                             f"{str(choice.get('delta'))[:100]}")
        extra = {k: v for k, v in delta.items() if k not in TEXT_FIELDS and v not in (None, [], "")}
        logprobs = choice.get("logprobs")
        if extra or logprobs:
            out.append(Token(text, extra or None, logprobs or None))
        elif text:
            out.append(text)
        if choice.get("finish_reason"):
            state.finish_reason = str(choice["finish_reason"])
    return out


def continued_params(body: dict[str, Any], done: int) -> None:
    """The tenant's params that mean another thing to a call continuing `done` tokens of output: `echo` would
    stream the output so far again first (vLLM echoes the last message, the assistant's once
    add_generation_prompt is false); `min_tokens` counts this call's tokens only, so it is lowered by those done
    (dropped at 0: a minimum above the max_tokens left is a 400 on vLLM, else a run longer than uninterrupted)."""
    body.pop("echo", None)
    least = body.get("min_tokens")
    if isinstance(least, int | float) and not isinstance(least, bool):  # another value: the backend's to refuse
        if least - done > 0:
            body["min_tokens"] = least - done
        else:
            del body["min_tokens"]


def event_pieces(payload: bytes, event: bytes, state: StreamState, strict_done: bool) -> list[Piece] | None:
    """The tokens of one SSE event of a stream (its name and its data); None at `[DONE]`, the stream's end.
    Data that is not a chunk object (`null`, a list) is a broken backend's: a ValueError, like bad JSON."""
    if event == b"error":  # `event: error` then its `data:` (a server's failure mid-stream)
        raise stream_error(payload)
    if payload == b"[DONE]":
        if strict_done and state.finish_reason is None:  # llama-cpp-python interrupted it for another
            raise Transient("the stream ended with [DONE] but no finish_reason (cut short)")
        return None
    chunk = orjson.loads(payload)
    if not isinstance(chunk, dict):
        raise ValueError(f"the stream sent data that is not a chunk: {payload[:100].decode(errors='replace')}")
    if "error" in chunk:  # vLLM and TGI report errors inside the stream
        raise stream_error(payload)
    return pieces_of(chunk, state)


class OpenAIEngine:
    def __init__(self, base_url: str, *, api_key: str | None = None, models: dict[str, str] | None = None,
                 timeout: float = 60.0, retries: int = 4, backoff_initial: float = 0.5,
                 backoff_max: float = 8.0, send_priority: bool = True, first_token_timeout: float = 120.0,
                 idle_timeout: float = 30.0, tracing: Tracing | None = None,
                 retry_after_max: float = RETRY_AFTER_MAX_SECONDS) -> None:
        # Credentials in the URL (`https://user:pass@host/v1`) go as a Basic Authorization header on every call
        # (an API key's Bearer wins), and never into a log line: base_url is the URL without them.
        self.base_url, basic = split_userinfo(base_url.rstrip("/"))
        self.tracing = tracing  # --otel-endpoint: a span per backend call, its traceparent sent along
        self.models = dict(models or {})
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self.send_priority = send_priority
        self.ask_usage = True
        self.send_seed = True  # a seed of the request's own when the caller sent none (body()), until refused
        self.first_token_timeout = first_token_timeout
        self.idle_timeout = idle_timeout
        self.headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if api_key or basic:
            self.headers["authorization"] = f"Bearer {api_key}" if api_key else str(basic)
        self.http = HTTP1Client(self.base_url, {"user-agent": "sluicegate", **self.headers}, connect_timeout=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._served_model: str | None = None
        self.capabilities = Capabilities()  # until probe(): an unknown OpenAI-compatible server
        self._count_overhead: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIEngine:
        if not settings.backend_url:
            raise ValueError("the openai engine needs --backend-url (e.g. http://127.0.0.1:8001/v1)")
        return cls(settings.backend_url, api_key=settings.backend_api_key, models=settings.backend_models(),
                   timeout=settings.backend_timeout, retries=settings.backend_retries,
                   first_token_timeout=settings.backend_first_token_timeout,
                   idle_timeout=settings.backend_idle_timeout,
                   tracing=tracing_for(settings.otel_endpoint, "sluicegate-worker") if settings.otel_endpoint else None)

    @property
    def session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the worker's event loop."""
        if self._session is None:
            # Reads are bounded by the first-token and idle deadlines (keep-alive comments do not count
            # as activity there, and a long prefill may exceed any fixed socket read timeout).
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=None)
            self._session = aiohttp.ClientSession(
                timeout=timeout, headers=self.headers,
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30))
        return self._session

    async def aclose(self) -> None:
        await self.http.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- the request -------------------------------------------------------------------------
    def configured_model(self, group: str) -> str | None:
        """`--backend-model` for the group (or `*`), if set."""
        return self.models.get(group) or self.models.get("*")

    async def model_for(self, group: str) -> str:
        """`--backend-model` for the group (or `*`); else the first model the backend serves, learnt and kept
        while the backend lists it (`probe`, `_relearn`: one restarted with another model)."""
        configured = self.configured_model(group)
        if configured:
            return configured
        if self._served_model is None:
            self._served_model = (await self._served_models())[0]
        return self._served_model

    async def _served_models(self) -> list[str]:
        """The ids of the backend's /models (at least one, else Permanent: --backend-model is needed)."""
        async with asyncio.timeout(self.timeout), self.session.get(f"{self.base_url}/models") as response:
            body = await response.read()
            if response.status != 200:
                self._raise_for_status(response.status, body, response.headers)
            listing = orjson.loads(body)
            items = listing.get("data") if isinstance(listing, dict) else None
            if not isinstance(items, list):  # (`{"data": 5}`: no model listed, not a TypeError)
                items = []
            served = [str(m["id"]) for m in items if isinstance(m, dict) and m.get("id")]
        if not served:
            raise Permanent("the backend's /models lists no model; set --backend-model")
        return served

    async def _relearn(self, refused: str) -> bool:
        """After a 404 saying the backend does not serve `refused`, the model its /models named: whether it now
        serves one model, another (a single-model server, vLLM's, restarted with another), which is learnt
        instead, so that the run is tried again with it. A backend that still lists the refused model, or lists
        several (Ollama's after an `ollama rm`), keeps the refusal, the request's: a tenant is not answered by a
        model nobody chose."""
        served = await self._served_models()
        if refused in served or len(served) != 1:
            return False
        if self._served_model == refused:  # (another run may have learnt the new one meanwhile)
            self._served_model = served[0]
        log.warning("backend %s no longer serves model %s but %s: tried again with it", self.base_url, refused,
                    served[0])
        return True

    async def probe(self, group: str) -> Capabilities:
        """Learn what the backend can do (workers/engines/probe.py) and act on it. The model it serves is
        listed again: a backend probed again may have restarted with another; the one learnt is kept while it
        is listed (a listing whose order changed, Ollama's after a pull, changes nothing)."""
        if self.configured_model(group) is None:
            served = await self._served_models()
            if self._served_model not in served:
                self._served_model = served[0]
        found = await probe(self.session, self.base_url, await self.model_for(group))
        self.capabilities = found
        self.send_priority = self.send_priority and found.accepts_priority
        return found

    def resume_by(self, continues: bool) -> None:
        """--backend-continue yes|no: how a resume gets the rest, whatever the probe found."""
        self.capabilities = replace(self.capabilities, continues=continues)

    @property
    def resume_mode(self) -> str:
        """How a resumed run gets the rest of its output: `continue` (the engine continues the output so
        far) or `regenerate` (the engine generates from the start again; the tokens already streamed
        are skipped: the same text under greedy decoding, possibly another one when sampling)."""
        return "continue" if self.capabilities.continues else "regenerate"

    def body(self, run: RunSpec, so_far: str, model: str, continues: bool | None = None,
             done: int | None = None) -> dict[str, Any]:
        """The call's body; `continues`: whether a resumed run asks the engine to continue its output so far
        (by default, as the engine can), or asks for the whole output again; `done`: the tokens of the output
        so far, which a continuation's max_tokens leaves out (by default start_index, one per chunk)."""
        continues = self.capabilities.continues if continues is None else continues
        body = {k: v for k, v in run.params.items() if k not in ENGINE_OWNED_PARAMS}  # never overridden
        messages = run.messages
        body.update(model=model, messages=messages, stream=True)
        budget = self.capabilities.budget_field  # max_tokens, or the newer name where it is refused
        done = run.start_index if done is None else done
        body[budget] = run.max_tokens - done
        if run.start_index > 0 and continues:
            body.update(messages=[*messages, {"role": "assistant", "content": so_far}],
                        continue_final_message=True, add_generation_prompt=False)
            continued_params(body, done)
        elif run.start_index > 0:  # regenerate: the whole output again, its first start_index tokens skipped
            body[budget] = run.max_tokens
        if not self.capabilities.continues and self.send_seed and INJECTED_SEED not in body:
            # A resume regenerates: a seed of the request's own makes a sampled output come out the same
            # again on an engine that honours it (greedy decoding needs none). A backend that refuses it
            # gets it no more (_post); the caller's own seed is the request's and goes as sent.
            body[INJECTED_SEED] = int(hashlib.sha1(run.request_id.encode()).hexdigest()[:8], 16) % 2**31
        if self.ask_usage:
            body["stream_options"] = {"include_usage": True}
        if self.send_priority:
            body["priority"] = run.priority if self.capabilities.priority_higher_first else 9 - run.priority
        return body

    @staticmethod
    def _raise_for_status(status: int, body: bytes, headers: Mapping[str, str]) -> None:
        """`headers`: the response's (looked up by lower-case name), for a retried status's Retry-After."""
        message = error_message(status, body)
        if status >= 500 or status in RETRIED_STATUSES or names_engine_death(message):
            raise Transient(message, retry_after=retry_after_seconds(headers.get("retry-after")),
                            down=status == UNAVAILABLE, gateway=status in GATEWAY_STATUSES)
        raise Permanent(message)

    # ---- streaming ---------------------------------------------------------------------------
    def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[Piece]:
        if self.tracing is None:
            return self._generate(run, so_far)
        model = self.models.get(run.group) or self.models.get("*") or self._served_model
        return traced_stream(self.tracing, run, lambda headers: self._generate(run, so_far, headers),
                             server=self.base_url, model=model)

    async def _generate(self, run: RunSpec, so_far: str,
                        headers: dict[str, str] | None = None) -> AsyncGenerator[Piece, None]:
        if run.max_tokens - run.start_index <= 0:
            return
        state = StreamState()
        continues = run.start_index > 0 and self.capabilities.continues
        # A continuation asks for max_tokens less the output so far, and its usage moves that back (_output_tokens)
        counted, done = await self._output_tokens(run, so_far) if continues else (run.start_index, run.start_index)
        if continues and run.max_tokens - done <= 0:  # the output so far is max_tokens already: ended (length)
            return
        try:
            response, tokens, first = await self._open(run, so_far, state, headers, continues, done)
        except EngineError as error:
            # The call that continues the output differs from the one the backend took (llama.cpp refuses
            # an assistant prefill with thinking on, or after an assistant turn of the tenant's): its refusal
            # is no fault of the request's. This attempt generates the whole output again instead.
            if not continues or error.transient:  # _open's only lasting failure is a refusal
                raise
            log.warning("run %s|%s: the backend refused to continue the output so far (%s); generating it again",
                        run.request_id, run.attempt, error)
            continues = False
            state = StreamState()
            response, tokens, first = await self._open(run, so_far, state, headers, continues, done)
        skip = run.start_index if run.start_index and not continues else 0
        remaining = run.max_tokens - (done if continues else run.start_index)
        asked = remaining + skip  # the max_tokens this call asked for (body())
        # A backend ends its stream itself, within max_tokens: every chunk it sent is kept, however many
        # chunks its tokens came in. Only a runaway one, past its max_tokens, is cut here.
        most = asked * RUNAWAY_CHUNKS_PER_TOKEN + RUNAWAY_SLACK
        skipped: list[str] = []
        # A continuation may have to stop at a stop string split by the seam, which the backend cannot see
        stops = stop_strings(run.params) if continues else []
        seam = StopSeam(so_far, stops, bool(run.params.get("include_stop_str_in_output"))) if stops else None
        produced = read = 0
        cut = stopped = False
        generated: list[str] = []  # this call's text, skipped tokens included (counted when no usage comes)
        keep_text = self.capabilities.counts_tokens
        ended = False
        idle = IdleDeadline(self.idle_timeout)
        try:
            piece = first
            while piece is not None:
                read += 1
                if read > most or (state.finish_reason is None and usage_over(state.usage, asked)):
                    cut = True  # closing the stream aborts the generation
                    break
                if keep_text:
                    generated.append(piece if isinstance(piece, str) else piece.text)
                if skip and isinstance(piece, Token) and piece.delta:
                    # What was streamed before is text only (a non-text delta pins a run, never resumed): this
                    # output went another way, into a tool call (or reasoning). Skipping its head would stream
                    # a call without its id, type and name; it goes out whole, after the text streamed before.
                    log.warning("run %s|%s: the regenerated output turned to a non-text delta (%s) after %d of the "
                                "%d tokens streamed before; it goes out whole from there", run.request_id,
                                run.attempt, ", ".join(piece.delta), len(skipped), run.start_index)
                    skip = 0
                if skip:
                    skip -= 1
                    skipped.append(piece if isinstance(piece, str) else piece.text)
                    if not skip and "".join(skipped) != so_far:  # sampled differently: the seam shows
                        log.warning("run %s|%s: the regenerated output differs from what was streamed before "
                                    "index %d; the rest continues the new one", run.request_id, run.attempt,
                                    run.start_index)
                elif seam is None:  # (most runs: no list a token)
                    yield piece
                    produced += 1
                else:
                    ready, stopped = seam.feed(piece)
                    for out in ready:
                        yield out
                        produced += 1
                    if stopped:  # at a stop string across the seam: where the uninterrupted run ended
                        log.info("run %s|%s: a stop string across the resume's seam ended the output",
                                 run.request_id, run.attempt)
                        break
                try:
                    piece = await idle.next(tokens)
                except (Transient, Permanent, HTTPClientError, TimeoutError, ValueError) as error:
                    if state.finish_reason is None:
                        if isinstance(error, TimeoutError):
                            raise Transient(f"no token for {self.idle_timeout:g} s (--backend-idle-timeout)") from None
                        raise
                    # The backend said its generation ended: what broke is only its usage or [DONE]. A resume
                    # would append to a finished answer (or fail a whole tool call): it ends here, finished.
                    log.info("run %s|%s: the backend's stream broke after its finish_reason (%s); ended there",
                             run.request_id, run.attempt, describe(error))
                    break
            ended = piece is None  # the stream's own end: its last bytes are read and the connection kept
            for out in seam.flush() if seam is not None and not stopped else ():  # held, and no match came
                yield out
                produced += 1
            if cut:  # Sluicegate ended it: at the length limit, whatever the backend meant to say
                state.finish_reason = "length"
            elif stopped:  # closing the stream aborts the rest of the generation
                state.finish_reason = "stop"
            if state.usage is None and self.capabilities.counts_tokens:
                state.usage = await self._count_usage(run, so_far, "".join(generated), continues)
            yield self._finish(state, produced, remaining, counted if continues else 0)
        except (Transient, HTTPClientError, TimeoutError, ValueError) as error:
            raise EngineError(f"backend stream broke after {produced} tokens: {describe(error)}",
                              transient=True) from error
        except Permanent as error:
            # The backend took the request and generated: an error it reports after that is its generation's,
            # whatever its tag (vLLM tags every failure in its stream generator a 400 BadRequestError, a dead
            # engine's included). Handed back, the run resumes; a real refusal uses up --max-attempts.
            raise EngineError(f"backend stream broke after {produced} tokens: {error}", transient=True) from error
        finally:
            idle.close()
            await tokens.aclose()
            response.release(drain=ended)  # kept when read to the end; closed (aborting the backend) otherwise

    async def _count_usage(self, run: RunSpec, so_far: str, generated: str,
                           continued: bool) -> dict[str, Any] | None:
        """Usage for an engine whose stream reports none, counted with its own tokenizer: the output
        exactly; the prompt as its messages' text, walked as the submit's estimate walks it (message_texts:
        contents, text parts, tool calls' names and arguments; PART_TOKENS for each other part, an image's
        base64 not tokenized), without the chat template's own tokens, which only the engine knows. For a
        continued run it is counted as the call saw it (usage_as_uninterrupted moves it back)."""
        texts = list(message_texts(run.messages))
        parts = texts.count(None)
        prompt = "\n".join(text for text in texts if text is not None) + (so_far if continued else "")
        output = generated
        try:
            if self._count_overhead is None:  # what the tokenizer adds to any text (a BOS token, say)
                self._count_overhead = await self._count("")
            # a chat template starts with BOS too: kept
            prompt_tokens = await self._count(prompt) + parts * PART_TOKENS
            completion_tokens = max(0, await self._count(output) - self._count_overhead)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as error:
            log.warning("backend %s: counting tokens failed (%s); usage is Sluicegate's estimate", self.base_url, error)
            return None
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens, "counted_by": "tokenizer"}

    async def _output_tokens(self, run: RunSpec, so_far: str) -> tuple[int, int]:
        """The tokens of a continued run's output so far: (the backend tokenizer's count, what the budget leaves
        out). start_index counts chunks, and a chunk may carry several tokens (vLLM under speculative decoding,
        SGLang with --stream-interval), so a backend with a tokenizer endpoint counts them; the budget takes the
        larger of that and start_index (vLLM's and SGLang's chunks carry at least one token each, and a text
        tokenized again can come out shorter than as generated). Both are start_index for a backend without
        one, or when the count fails: better a usage moved back by chunks than a resume that waits."""
        if not (self.capabilities.counts_tokens or self.capabilities.server in TOKENIZE_SERVERS):
            return run.start_index, run.start_index
        model = self.models.get(run.group) or self.models.get("*") or self._served_model
        try:
            if self._count_overhead is None:  # what the tokenizer adds to any text (a BOS token, say)
                self._count_overhead = await self._count("", model)
            counted = max(0, await self._count(so_far, model) - self._count_overhead)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as error:
            log.warning("run %s|%s: backend %s: counting the output so far failed (%s); counted as its %d chunks",
                        run.request_id, run.attempt, self.base_url, describe(error), run.start_index)
            return run.start_index, run.start_index
        return counted, max(counted, run.start_index)

    async def _count(self, text: str, model: str | None = None) -> int:
        """`text`'s tokens by the backend's tokenizer: llama-cpp-python's count endpoint, else `/tokenize` at the
        server's root, asked in llama.cpp's words (`content`) and in vLLM's and SGLang's (`prompt`, and `model`
        when known), each of which reads its own and ignores the others."""
        root = root_of(self.base_url)
        async with asyncio.timeout(COUNT_TIMEOUT):  # the run holds its slot meanwhile
            if self.capabilities.server == "llama-cpp-python":
                async with self.session.post(f"{root}/extras/tokenize/count", data=orjson.dumps({"input": text})) as r:
                    return int(orjson.loads(await r.read())["count"])
            body: dict[str, Any] = {"content": text, "prompt": text}
            if model:
                body["model"] = model
            async with self.session.post(f"{root}/tokenize", data=orjson.dumps(body)) as r:
                payload = await r.read()
                if r.status != 200:
                    raise ValueError(f"the tokenize endpoint answered {r.status}")
                tokens = orjson.loads(payload)["tokens"]
                if not isinstance(tokens, list):
                    raise ValueError("the tokenize endpoint sent no list of tokens")
                return len(tokens)

    @staticmethod
    def _finish(state: StreamState, produced: int, remaining: int, moved: int) -> Finish:
        """How the stream ended: the backend's finish_reason (`length` when Sluicegate cut it), and
        its usage for the whole request (a regenerated run's call generated all of it; a continued one's
        prompt held the output so far, `moved` tokens, which are output)."""
        reason = state.finish_reason or ("length" if produced >= remaining else "stop")
        return Finish(reason, usage_as_uninterrupted(state.usage, moved))

    async def _open(self, run: RunSpec, so_far: str, state: StreamState, headers: dict[str, str] | None,
                    continues: bool, done: int | None = None) -> tuple[Response, Any, Piece | None]:
        """Connect and read up to the first token, retrying transient failures."""
        def retrying() -> AsyncRetrying:
            backoff = wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
            return AsyncRetrying(stop=stop_after_attempt(self.retries), reraise=True,
                                 wait=honouring_retry_after(backoff, self.retry_after_max),
                                 retry=retry_if_exception_type(Transient))

        # a try failed after reaching the backend (neither `down` nor a proxy's answer for it): no BackendDown then
        reached = False

        async def attempt() -> tuple[Response, Any, Piece | None]:
            nonlocal reached
            try:
                return await self._attempt(run, so_far, state, headers, continues, done)
            except Transient as error:
                reached = reached or not (error.down or error.gateway)
                raise

        try:
            return await first_try_then(attempt, retrying, lambda error: isinstance(error, Transient))
        except Transient as error:  # tenants read the message: the backend's address goes to the log only
            log.warning("run %s|%s: backend %s failed %d times before the first token: %s", run.request_id,
                        run.attempt, self.base_url, self.retries, error)
            message = f"the backend failed {self.retries} times before the first token; last error: {error}"
            # Not reached on any try, or not up: no failure of the request's (BackendDown). A backend that a try
            # reached and that refuses the later ones may have died of this very request: a failed attempt.
            if error.down and not reached:
                raise BackendDown(message) from error
            raise EngineError(message, transient=True) from error
        except Permanent as error:
            log.warning("run %s|%s: backend %s refused the request: %s", run.request_id, run.attempt, self.base_url,
                        error)
            raise EngineError(f"{BACKEND_REFUSED_PREFIX}{error}", transient=False) from error

    async def _attempt(self, run: RunSpec, so_far: str, state: StreamState, headers: dict[str, str] | None,
                       continues: bool, done: int | None = None) -> tuple[Response, Any, Piece | None]:
        # Each try starts from a clean state: a finish_reason (or usage) a failed try read before its first
        # token is not this try's, and would end a later cut-short stream as finished.
        state.finish_reason = state.usage = None
        try:
            async with asyncio.timeout(self.first_token_timeout):
                body = self.body(run, so_far, await self.model_for(run.group), continues, done)
                ours = OPTIONAL_FIELDS if INJECTED_SEED in run.params else (*OPTIONAL_FIELDS, INJECTED_SEED)
                response = await self._post(body, headers, ours, learnt=self.configured_model(run.group) is None)
                tokens = self._tokens(response, state, strict_done=self.capabilities.interrupts)
                try:
                    first = await anext(tokens, None)
                except BaseException:
                    await tokens.aclose()
                    response.release()
                    raise
                return response, tokens, first
        except TimeoutError:
            raise Transient(f"no first token within {self.first_token_timeout:g} s "
                            "(--backend-first-token-timeout)") from None
        except (HTTPClientError, aiohttp.ClientError, ValueError) as error:  # aiohttp's: the model listing
            raise Transient(describe(error), down=unreachable(error)) from error

    async def _post(self, body: dict[str, Any], headers: dict[str, str] | None = None,
                    ours: tuple[str, ...] = OPTIONAL_FIELDS, *, learnt: bool = False) -> Response:
        """`headers`: besides the engine's (the W3C traceparent of the call's span, when tracing). A 400 that
        names a field of ours (`ours`: the seed too when Sluicegate added it; or that asks for
        `max_completion_tokens`) is tried again without it (renamed), and learnt for good only when that try
        is served: vLLM and SGLang echo the whole request in every validation 400, so one tenant's bad request
        names them all, and must not change the engine for all. `learnt`: the model is the one the backend's
        /models named (no --backend-model); a 404 naming it (vLLM's "The model `x` does not exist", Ollama's)
        is a backend restarted with another: the name is forgotten and the try is transient, the next one
        listing the models again (bounded by the tries: a listing that names a refused model fails the attempt)."""
        lessons: list[str] = []  # the fields left out (or "budget": renamed) on this call's way
        while True:
            response = await self.http.post("/chat/completions", orjson.dumps(body), headers)
            if response.status == 200:
                await self._expect_stream(response)
                self._learn(lessons)
                return response
            payload = await response.read()
            field = refused_field(response.status, payload, body, ours)
            if field is not None:
                body.pop(field)
                lessons.append(field)
                continue
            if renamed_budget(response.status, payload, body):
                lessons.append("budget")
                continue
            if learnt and refuses_model(response.status, payload, body["model"]) and await self._relearn(
                    body["model"]):
                raise Transient(f"{error_message(response.status, payload)} (the model its /models named; "
                                "it serves another now)")
            self._raise_for_status(response.status, payload, response.headers)  # the request's own error

    def _learn(self, lessons: list[str]) -> None:
        """What a served retry showed the backend refuses: not sent again (the budget asked by its newer name)."""
        for lesson in lessons:
            if lesson == "budget":
                log.warning("backend %s refuses `max_tokens`; sending `max_completion_tokens` from now on",
                            self.base_url)
                self.capabilities = replace(self.capabilities, budget_field="max_completion_tokens")
                continue
            log.warning("backend %s rejects `%s`; sending requests without it from now on", self.base_url, lesson)
            if lesson == "priority":
                self.send_priority = False
            elif lesson == INJECTED_SEED:
                self.send_seed = False
            else:
                self.ask_usage = False

    @staticmethod
    async def _expect_stream(response: Response) -> None:
        """A 200 that says it is not an event stream (a JSON error served with 200, an HTML page from a wrong
        --backend-url) is read, bounded, for the backend's words, not as a stream cut short (retried); one that
        names no content-type is read as a stream."""
        kind = response.headers.get("content-type")
        if kind is None or kind.split(";", 1)[0].strip().lower() == "text/event-stream":
            return
        payload = await response.read()
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict) and ("error" in data or data.get("object") == "error"):
            raise stream_error(payload)
        raise Permanent(error_message(200, payload))

    @staticmethod
    async def _tokens(response: AsyncIterable[bytes], state: StreamState, *,
                      strict_done: bool = False) -> AsyncIterator[Piece]:
        """Tokens from an SSE body; a stream that ends without `[DONE]` or a finish_reason is cut short,
        and so is (`strict_done`: a server known to interrupt streams) a `[DONE]` without a finish_reason.
        As the SSE spec reads a stream, an event's `data:` lines are joined with a newline and read once at
        the blank line that ends it, and an event with no data (a bare `data:` keep-alive) is skipped.
        A failure the backend reports in the stream ends it with the backend's words (stream_error):
        `data: {"error": ...}` (vLLM, TGI), an `error: {...}` line (llama.cpp) or `data:` after `event: error`."""
        event = b""  # the event's name (an `event:` line), until the blank line that ends the event
        data: bytes | None = None  # the event's data, likewise (nearly always one line)
        async with aclosing(sse_lines(response)) as lines:  # closed at [DONE], not by the GC
            async for line in lines:
                if line.startswith(b"data:"):
                    if data is None:
                        data = line[5:].strip()
                    else:  # the event's data goes on: joined by a newline (SSE)
                        data += b"\n" + line[5:].strip()
                        if len(data) > MAX_LINE:  # as for one line: never an unbounded buffer
                            raise ValueError(f"an event of the backend's stream is over {MAX_LINE} bytes")
                    continue
                if line.strip():
                    if line.startswith(b"error:"):  # llama.cpp's server: server_sent_event(sink, "error", ...)
                        raise stream_error(line[6:].strip())
                    if line.startswith(b"event:"):
                        event = line[6:].strip()
                    continue  # comments (keep-alives), other fields
                payload, name, data, event = data, event, None, b""  # a blank line: the event is whole
                if payload:
                    pieces = event_pieces(payload, name, state, strict_done)
                    if pieces is None:
                        return
                    for piece in pieces:
                        yield piece
            if data:  # the last event without its blank line: read all the same, as before the SSE reading
                pieces = event_pieces(data, event, state, strict_done)
                if pieces is None:
                    return
                for piece in pieces:
                    yield piece
        if state.finish_reason is None:
            raise Transient("the stream ended before [DONE]")
