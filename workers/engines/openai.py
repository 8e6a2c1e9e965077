"""The `openai` engine: stream a run from any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, Ollama).

One aiohttp session per worker process, pooled keep-alive connections (aiohttp costs far less CPU
per stream than httpx). Each non-empty `delta.content` of a chunk is one token of the run.

Failures, and who handles them:
- before the first token (connection refused, timeout, 408, 429, 5xx, a stream cut short): retried
  here with tenacity, exponential backoff with full jitter (waits drawn from [0, 0.5 s x 2^n], at
  most 8 s), at most `retries` attempts; then the run ends with a permanent EngineError naming the
  backend and its last error. Other 4xx are permanent at once (the request itself is wrong).
- after tokens streamed: a transient EngineError; the worker hands the run back and it resumes,
  possibly elsewhere, from the tokens so far (bounded by the worker's `backend_retries`).

Resume sends the output so far as a final assistant message with vLLM's `continue_final_message`
(and `add_generation_prompt: false`), asking for the remaining `max_tokens - start_index` tokens.

Priority: vLLM schedules lower values first (with `--scheduling-policy priority`), so Sluicegate's
0..9 (higher first) is sent as `priority = 9 - p`. A server that rejects the field (vLLM without
priority scheduling answers 400 "...Priority scheduling is not enabled") is asked again without it,
and this engine stops sending it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from sluicegate.sessions.runs import RunSpec
from sluicegate.settings import Settings
from sluicegate.workers.engines.base import EngineError
from sluicegate.workers.retrying import first_try_then

log = logging.getLogger(__name__)

# Fields the engine owns: run params (temperature, top_p, stop, seed, ...) never override them.
RESERVED = frozenset({"model", "messages", "stream", "max_tokens", "max_completion_tokens", "n", "priority",
                      "continue_final_message", "add_generation_prompt"})
RETRIED_STATUSES = frozenset({408, 429})


class Transient(Exception):
    """A failure worth another attempt."""


class Permanent(Exception):
    """A failure no retry can fix."""


def describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect ({error.os_error.strerror or error.os_error})"
    if isinstance(error, TimeoutError):
        return f"timed out ({type(error).__name__})"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "the connection closed in the middle of the response"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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


class OpenAIEngine:
    def __init__(self, base_url: str, *, api_key: str | None = None, models: dict[str, str] | None = None,
                 timeout: float = 60.0, retries: int = 4, backoff_initial: float = 0.5,
                 backoff_max: float = 8.0, send_priority: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.models = dict(models or {})
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.send_priority = send_priority
        self.headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._served_model: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIEngine:
        if not settings.backend_url:
            raise ValueError("the openai engine needs --backend-url (e.g. http://127.0.0.1:8001/v1)")
        return cls(settings.backend_url, api_key=settings.backend_api_key, models=settings.backend_models(),
                   timeout=settings.backend_timeout, retries=settings.backend_retries)

    @property
    def session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the worker's event loop."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
            self._session = aiohttp.ClientSession(
                timeout=timeout, headers=self.headers,
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30))
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- the request -------------------------------------------------------------------------
    async def model_for(self, group: str) -> str:
        """`--backend-model` for the group (or `*`); else the first model the backend serves."""
        configured = self.models.get(group) or self.models.get("*")
        if configured:
            return configured
        if self._served_model is None:
            async with self.session.get(f"{self.base_url}/models") as response:
                body = await response.read()
                if response.status != 200:
                    self._raise_for_status(response.status, body)
                listing = orjson.loads(body)
                items = listing.get("data") if isinstance(listing, dict) else None
                served = [m["id"] for m in items or () if isinstance(m, dict) and m.get("id")]
            if not served:
                raise Permanent(f"{self.base_url}/models lists no model; set --backend-model")
            self._served_model = str(served[0])
        return self._served_model

    def body(self, run: RunSpec, so_far: str, model: str) -> dict[str, Any]:
        body = {k: v for k, v in run.params.items() if k not in RESERVED}
        messages = run.messages
        body.update(model=model, messages=messages, stream=True, max_tokens=run.max_tokens - run.start_index)
        if run.start_index > 0:
            body.update(messages=[*messages, {"role": "assistant", "content": so_far}],
                        continue_final_message=True, add_generation_prompt=False)
        if self.send_priority:
            body["priority"] = 9 - run.priority
        return body

    @staticmethod
    def _raise_for_status(status: int, body: bytes) -> None:
        message = error_message(status, body)
        if status >= 500 or status in RETRIED_STATUSES:
            raise Transient(message)
        raise Permanent(message)

    # ---- streaming ---------------------------------------------------------------------------
    def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[str]:
        return self._generate(run, so_far)

    async def _generate(self, run: RunSpec, so_far: str) -> AsyncIterator[str]:
        remaining = run.max_tokens - run.start_index
        if remaining <= 0:
            return
        response, tokens, first = await self._open(run, so_far)
        produced = 0
        try:
            if first is None:
                return
            yield first
            produced = 1
            async for text in tokens:
                if produced == remaining:  # a backend that overshoots max_tokens: never past the run's end
                    break
                yield text
                produced += 1
        except (Transient, aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise EngineError(f"backend stream broke after {produced} tokens: {describe(error)}",
                              transient=True) from error
        except Permanent as error:
            raise EngineError(f"backend stream failed after {produced} tokens: {error}", transient=False) from error
        finally:
            await tokens.aclose()
            response.release()  # back to the pool when read to the end; closed (aborting the backend) otherwise

    async def _open(self, run: RunSpec, so_far: str) -> tuple[aiohttp.ClientResponse, Any, str | None]:
        """Connect and read up to the first token, retrying transient failures."""
        def retrying() -> AsyncRetrying:
            return AsyncRetrying(stop=stop_after_attempt(self.retries), reraise=True,
                                 wait=wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max),
                                 retry=retry_if_exception_type(Transient))

        try:
            return await first_try_then(lambda: self._attempt(run, so_far), retrying, (Transient,))
        except Transient as error:
            raise EngineError(f"backend {self.base_url} failed {self.retries} times before the first token; "
                              f"last error: {error}", transient=False) from error
        except Permanent as error:
            raise EngineError(f"backend {self.base_url} refused the request: {error}", transient=False) from error

    async def _attempt(self, run: RunSpec, so_far: str) -> tuple[aiohttp.ClientResponse, Any, str | None]:
        try:
            body = self.body(run, so_far, await self.model_for(run.group))
            response = await self._post(body)
            tokens = self._tokens(response)
            try:
                first = await anext(tokens, None)
            except BaseException:
                await tokens.aclose()
                response.release()
                raise
            return response, tokens, first
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise Transient(describe(error)) from error

    async def _post(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        url = f"{self.base_url}/chat/completions"
        while True:
            response = await self.session.post(url, data=orjson.dumps(body))
            if response.status == 200:
                return response
            payload = await response.read()
            response.release()
            if response.status == 400 and "priority" in body and b"priority" in payload.lower():
                log.warning("backend %s rejects `priority`; sending requests without it from now on: %s",
                            self.base_url, error_message(400, payload))
                self.send_priority = False
                body.pop("priority")
                continue
            self._raise_for_status(response.status, payload)

    @staticmethod
    async def _tokens(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
        """Token texts from an SSE body; a stream that ends without `[DONE]` or a finish_reason is cut short."""
        finished = False
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (keep-alives), event names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            chunk = orjson.loads(payload)
            if "error" in chunk:  # vLLM reports errors inside the stream
                error = chunk["error"]
                code = error.get("code") if isinstance(error, dict) else None
                message = error_message(code if isinstance(code, int) else 500, payload)
                if isinstance(code, int) and 400 <= code < 500 and code not in RETRIED_STATUSES:
                    raise Permanent(message)
                raise Transient(message)
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text
                if choice.get("finish_reason"):
                    finished = True
        if not finished:
            raise Transient("the stream ended before [DONE]")
