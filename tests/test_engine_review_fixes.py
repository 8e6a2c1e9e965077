"""The openai engine's failures and counts, as a review found them wrong: a backend that dies of a request (a poison
prompt) and is refused afterwards fails the attempt (not BackendDown, handed back for free); a continued resume
counts the output so far in tokens, not chunks (vLLM under speculative decoding, SGLang with --stream-interval:
several tokens a chunk); a try starts from a clean stream state. Loopback servers, no Redis."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sluicegate.workers.engines.base import EngineError, Finish
from sluicegate.workers.engines.http1 import HTTP1Client, ServerClosed
from sluicegate.workers.engines.openai import OpenAIEngine
from sluicegate.workers.engines.probe import Capabilities
from tests.openai_helpers import ServerThread, read_posted_json
from tests.test_engine_unusual_answers import Calls, run_against, status
from tests.test_openai_engine_streams import DONE, MESSAGES, chunk, spec

pytestmark = pytest.mark.single_server  # no Redis: once is enough

CHUNKED_SSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def framed(body: bytes) -> bytes:
    """`body` as one HTTP/1.1 chunk (without the last chunk: the stream is not over)."""
    return f"{len(body):x}\r\n".encode() + body + b"\r\n"


def engine_for(port: int, retries: int = 4) -> OpenAIEngine:
    return OpenAIEngine(f"http://127.0.0.1:{port}/v1", models={"*": "m"}, retries=retries, backoff_initial=0.01,
                        backoff_max=0.02, timeout=5.0, first_token_timeout=5.0, idle_timeout=5.0)


async def drain(engine: OpenAIEngine, max_tokens: int = 8) -> tuple[list[Any], EngineError | None]:
    out: list[Any] = []
    try:
        async for piece in engine.stream(spec(max_tokens), ""):
            out.append(piece)
    except EngineError as error:
        return out, error
    return out, None


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def failed_run(handler: Callable[[Callable[[], None]], Handler]) -> EngineError | None:
    """One run against a backend served by `handler(close)` (`close`: the backend stops listening); it must
    stream nothing. Returns the run's error."""
    server: asyncio.Server | None = None

    def close() -> None:
        assert server is not None
        server.close()

    server = await asyncio.start_server(handler(close), "127.0.0.1", 0)
    engine = engine_for(server.sockets[0].getsockname()[1])
    try:
        out, error = await drain(engine)
    finally:
        await engine.aclose()
        server.close()
    assert out == []
    return error


# ---- 1. a backend that dies of the request ----------------------------------------------------------------------
async def dies_of_the_request() -> tuple[int, EngineError | None]:
    """A backend that reads the request, then dies (its listener closed, the connection aborted): every later
    try is refused. Returns the requests that reached it and the engine's error."""
    seen: list[dict[str, Any]] = []

    def handler(close: Callable[[], None]) -> Handler:
        async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await read_posted_json(reader))
            close()  # the process died: nothing listens any more
            writer.transport.abort()
        return die

    error = await failed_run(handler)
    return len(seen), error


def test_a_backend_that_dies_of_the_request_fails_the_attempt() -> None:
    """Old: `BackendDown` (the last try was refused), handed back without counting: the request crashed the
    group's backends up to 4 x --max-attempts times. It reached the backend: a failed attempt."""
    reached, error = asyncio.run(dies_of_the_request())
    assert reached == 1 and error is not None and error.transient, error
    assert type(error).__name__ != "BackendDown", error  # old: BackendDown
    assert "cannot connect" in str(error)  # the last try's words, as before


async def dies_on_a_kept_connection() -> tuple[int, int, list[Any], EngineError | None]:
    """A backend that serves one request (the connection kept), then dies of the next one sent on it. Returns
    the connections it accepted, the requests that reached it, the second run's pieces and its error."""
    server: asyncio.Server | None = None
    connections = 0
    requests = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections, requests
        connections += 1
        try:
            while True:
                await read_posted_json(reader)
                requests += 1
                if requests > 1:  # this one kills it
                    assert server is not None
                    server.close()
                    writer.transport.abort()
                    return
                writer.write(CHUNKED_SSE + framed(chunk({"content": "A"}, "stop") + DONE) + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    engine = engine_for(server.sockets[0].getsockname()[1])
    try:
        first, error = await drain(engine)
        assert error is None and first == ["A", Finish("stop")], (first, error)
        for _ in range(200):  # the stream's last bytes are read in the background, then the connection is kept
            if engine.http._idle:
                break
            await asyncio.sleep(0.01)
        out, error = await drain(engine)
    finally:
        await engine.aclose()
    return connections, requests, out, error


def test_a_backend_that_dies_of_a_request_on_a_kept_connection_fails_the_attempt() -> None:
    """On a kept connection the client sends the request again on a new one when the kept one was closed; that
    one was refused, and its `cannot connect` (not reached) replaced the closed connection. Old: BackendDown."""
    connections, requests, out, error = asyncio.run(dies_on_a_kept_connection())
    assert connections == 1 and requests == 2, (connections, requests)  # the kept connection was used
    assert out == [] and error is not None and error.transient, error
    assert type(error).__name__ != "BackendDown", error  # old: BackendDown


def test_the_resend_after_a_kept_connection_closed_fails_as_closed_when_refused() -> None:
    """The client itself: the request went out on the kept connection and the server died; the new connection
    is refused. Old: CannotConnect (unreachable, as if the request had never reached it)."""
    async def main() -> BaseException | None:
        server: asyncio.Server | None = None
        requests = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal requests
            while True:
                await read_posted_json(reader)
                requests += 1
                if requests > 1:
                    assert server is not None
                    server.close()
                    writer.transport.abort()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        client = HTTP1Client(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", {}, connect_timeout=5.0)
        try:
            response = await client.post("/x", b"{}")
            assert await response.read() == b"ok"  # read to its end: the connection is kept
            try:
                await client.post("/x", b"{}")
            except Exception as error:
                return error
            return None
        finally:
            await client.aclose()

    error = asyncio.run(main())
    assert isinstance(error, ServerClosed) and not error.unreachable, repr(error)  # old: CannotConnect


def test_a_backend_never_reached_stays_backend_down() -> None:
    """A 503 (not up) on the first try, then nothing listening: no try reached it, so BackendDown as before."""
    seen: list[int] = []

    def handler(close: Callable[[], None]) -> Handler:
        async def not_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_posted_json(reader)
            seen.append(503)
            writer.write(status(503, "Loading model"))
            await writer.drain()
            close()  # and then it goes away altogether
            writer.close()
        return not_up

    error = asyncio.run(failed_run(handler))
    assert seen == [503] and error is not None and type(error).__name__ == "BackendDown", error


def test_a_proxys_502_then_503s_stays_backend_down() -> None:
    """A proxy in front of a restarting backend answers 502 while its address is listed, then 503 once it is
    removed: no try reached the backend, so BackendDown (handed back free), not a counted attempt."""
    answered: list[int] = []

    def handler(close: Callable[[], None]) -> Handler:
        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_posted_json(reader)
            code = 502 if not answered else 503
            answered.append(code)
            writer.write(status(code, "Bad Gateway" if code == 502 else "Service Unavailable"))
            await writer.drain()
            writer.close()
        return proxy

    error = asyncio.run(failed_run(handler))
    assert answered[0] == 502 and len(answered) > 1 and set(answered[1:]) == {503}, answered
    assert error is not None and type(error).__name__ == "BackendDown", error  # old: a counted EngineError


# ---- 3. a stale finish_reason from a failed try -----------------------------------------------------------------
def test_a_finish_reason_of_a_failed_try_does_not_end_the_next_one() -> None:
    """Try 1 sends a finish_reason but no token, then is cut; try 2 sends two tokens and is cut. Old: try 1's
    `stop` made try 2's cut look like a missing [DONE]: ended `done` with a truncated answer, never resumed."""
    first = framed(chunk({"role": "assistant", "content": ""}) + chunk({}, "stop"))
    second = framed(chunk({"content": "A"}) + chunk({"content": "B"}))
    calls = Calls([CHUNKED_SSE + first, CHUNKED_SSE + second])  # each closed there: cut mid-body
    out, error = asyncio.run(run_against(calls))
    assert len(calls.bodies) == 2, calls.bodies
    assert out == ["A", "B"], out  # old: ["A", "B", Finish("stop")]
    assert error is not None and error.transient and "after 2 tokens" in str(error), error


# ---- 2. a continued resume counts the output so far in tokens ---------------------------------------------------
WORD = re.compile(r"\S+\s*")
PER_CHUNK = 3  # tokens a chunk carries (vLLM's accepted tokens of a speculative-decoding step)


def words(text: str) -> list[str]:
    return WORD.findall(text)


class ChunkyBackend:
    """An OpenAI-compatible server whose tokens are words (`w0 `, `w1 `, ...), sent PER_CHUNK to a chunk, that
    continues a final assistant message (vLLM's continue_final_message), always generates up to its max_tokens,
    reports usage as vLLM does (the output so far counted as prompt), and serves `/tokenize` in `field` (`prompt`:
    vLLM and SGLang, with a BOS token; `content`: llama.cpp, without). `tokenize_status`: another status fails it."""

    def __init__(self, field: str, bos: bool, tokenize_status: int = 200) -> None:
        self.field, self.bos, self.tokenize_status = field, bos, tokenize_status
        self.chats: list[dict[str, Any]] = []
        self.tokenized: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/tokenize", self.tokenize, methods=["POST"]),
                                 Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def tokenize(self, request: Request) -> Response:
        body = await request.json()
        self.tokenized.append(body)
        if self.tokenize_status != 200:
            return JSONResponse({"error": "no"}, status_code=self.tokenize_status)
        if not isinstance(body.get(self.field), str):
            return JSONResponse({"error": f"{self.field} is required"}, status_code=400)
        ids = list(range(len(words(body[self.field])) + (1 if self.bos else 0)))
        return JSONResponse({"tokens": ids, "count": len(ids)})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.chats.append(body)
        messages = body["messages"]
        so_far = messages[-1]["content"] if body.get("continue_final_message") else ""
        start = len(words(so_far))
        prompt = sum(len(words(m["content"])) for m in messages)  # the output so far included
        budget = body["max_tokens"]
        tokens = [f"w{start + i} " for i in range(budget)]

        async def stream() -> Any:
            for i in range(0, len(tokens), PER_CHUNK):
                last = i + PER_CHUNK >= len(tokens)
                yield chunk({"content": "".join(tokens[i:i + PER_CHUNK])}, "length" if last else None)
            yield chunk(choices=False, usage={"prompt_tokens": prompt, "completion_tokens": budget,
                                              "total_tokens": prompt + budget})
            yield DONE

        return StreamingResponse(stream(), media_type="text/event-stream")


KINDS = {"vllm": ("prompt", True), "sglang": ("prompt", True), "llama.cpp": ("content", False)}
PROMPT = sum(len(words(m["content"])) for m in MESSAGES)


def resume(backend: ChunkyBackend, kind: str, max_tokens: int, chunks: int) -> tuple[list[Any], EngineError | None]:
    """A run of `max_tokens` preempted after `chunks` chunks (PER_CHUNK tokens each), resumed by continuation."""
    so_far = "".join(f"w{i} " for i in range(chunks * PER_CHUNK))

    async def main() -> tuple[list[Any], EngineError | None]:
        engine = OpenAIEngine(server.url, models={"*": "m"}, retries=1, timeout=5.0, first_token_timeout=5.0,
                              idle_timeout=5.0)
        engine.capabilities = Capabilities(kind, continues=True, counts_tokens=kind == "llama.cpp")
        out: list[Any] = []
        try:
            async for piece in engine.stream(spec(max_tokens, start_index=chunks), so_far):
                out.append(piece)
        except EngineError as error:
            return out, error
        finally:
            await engine.aclose()
        return out, None

    with ServerThread(backend.app()) as server:
        return asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_continued_resume_counts_the_output_so_far_in_tokens(kind: str) -> None:
    """max_tokens 30, preempted after 4 chunks of 3 tokens: the resume asks for 18 more (old: 26, the answer
    reaching 38 tokens), and the usage moves back the 12 tokens sent as prompt (old: 4, so prompt 11 of 3)."""
    field, bos = KINDS[kind]
    backend = ChunkyBackend(field, bos)
    out, error = resume(backend, kind, max_tokens=30, chunks=4)
    assert error is None, error
    assert [c["max_tokens"] for c in backend.chats] == [18], backend.chats  # old: [26]
    assert backend.chats[0]["messages"][-1]["content"] == "".join(f"w{i} " for i in range(12))
    text = "".join(p for p in out if isinstance(p, str))
    assert words(text) == [f"w{i} " for i in range(12, 30)], text  # up to max_tokens, not past it
    finish = out[-1]
    assert isinstance(finish, Finish) and finish.reason == "length", out
    assert finish.usage == {"prompt_tokens": PROMPT, "completion_tokens": 30, "total_tokens": PROMPT + 30}, finish


@pytest.mark.parametrize("answer", [500, 404])
def test_a_failed_count_falls_back_to_the_chunks(answer: int) -> None:
    """A tokenize endpoint that fails: the output so far is start_index tokens, as before (the run goes on)."""
    backend = ChunkyBackend("prompt", True, tokenize_status=answer)
    out, error = resume(backend, "vllm", max_tokens=30, chunks=4)
    assert error is None and backend.tokenized, error
    assert [c["max_tokens"] for c in backend.chats] == [26], backend.chats
    finish = out[-1]
    assert isinstance(finish, Finish) and finish.usage is not None and finish.usage["prompt_tokens"] == PROMPT + 8


def test_an_output_so_far_of_max_tokens_ends_the_run_without_a_call() -> None:
    """10 chunks of 3 tokens reach max_tokens 30: nothing is asked (old: a call for 20 more)."""
    backend = ChunkyBackend("prompt", True)
    out, error = resume(backend, "vllm", max_tokens=30, chunks=10)
    assert error is None and out == [] and backend.chats == [], (out, error, backend.chats)


def test_a_server_without_a_tokenize_endpoint_is_not_asked() -> None:
    """TGI continues too, but its /tokenize takes another shape: no count is asked, start_index as before."""
    backend = ChunkyBackend("prompt", True)
    out, error = resume(backend, "tgi", max_tokens=30, chunks=4)
    assert error is None and backend.tokenized == [] and [c["max_tokens"] for c in backend.chats] == [26], error


def test_the_count_sends_each_servers_field() -> None:
    """vLLM's and SGLang's /tokenize read `prompt` (and `model`), llama.cpp's `content`: both are sent."""
    backend = ChunkyBackend("prompt", True)
    resume(backend, "sglang", max_tokens=30, chunks=4)
    so_far = "".join(f"w{i} " for i in range(12))
    assert {"content": so_far, "prompt": so_far, "model": "m"} in backend.tokenized, json.dumps(backend.tokenized)
