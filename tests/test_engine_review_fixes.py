"""The openai engine's failures and counts, as a review found them wrong: a backend that dies of a request (a poison
prompt) and is refused afterwards fails the attempt (not BackendDown, handed back for free); a continued resume
counts the output so far in tokens, not chunks (vLLM under speculative decoding, SGLang with --stream-interval:
several tokens a chunk); a try starts from a clean stream state. Loopback servers, no Redis."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sluicegate.sessions.requests import PART_TOKENS, estimate_message_tokens, message_texts
from sluicegate.workers.engines.base import EngineError, Finish
from sluicegate.workers.engines.http1 import HTTP1Client, ServerClosed
from sluicegate.workers.engines.openai import OpenAIEngine, StreamState, pieces_of
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


# ---- a second review: a backend restarted with another model; counts, continuations and chunks ----------------
class Several:
    """Ollama-like: /v1/models lists several served models (the latest pulled first), all served; a chat naming
    another gets Ollama's 404. Records the models the chats named and the listings."""

    def __init__(self, listing: list[str]) -> None:
        self.listing = listing
        self.chats: list[str] = []
        self.listings = 0

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/models", self.models), Route("/version", self.version),
                                 Route("/v1/chat/completions", self.chat, methods=["POST"])])

    def listed_ids(self) -> list[str]:
        return self.listing

    def refusal(self, model: str) -> Response | None:
        """The 404 of a chat naming `model`, when the backend does not serve it."""
        if model in self.listing:
            return None
        return JSONResponse({"error": {"message": f'model "{model}" not found, try pulling it first',
                                       "type": "api_error"}}, status_code=404)

    async def models(self, _: Request) -> Response:
        self.listings += 1
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in self.listed_ids()]})

    async def version(self, _: Request) -> Response:
        return JSONResponse({"version": "0.11.0"})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.chats.append(body["model"])
        refused = self.refusal(body["model"])
        if refused is not None:
            return refused
        return Response(chunk({"content": self.text_of(body["model"])}, "stop") + DONE, media_type="text/event-stream")

    def text_of(self, model: str) -> str:
        """The answer's text: the model that gave it."""
        return model


class Restarting(Several):
    """A vLLM-like server whose served model changes (a restart with another): /v1/models lists `model` (or
    `listed`), a chat naming another gets vLLM's 404 NotFoundError."""

    def __init__(self, model: str) -> None:
        super().__init__([model])
        self.model = model
        self.listed: str | None = None  # what /v1/models names, when not `model`

    def listed_ids(self) -> list[str]:
        return [self.listed or self.model]

    def text_of(self, model: str) -> str:
        return "ok"

    def refusal(self, model: str) -> Response | None:
        if model == self.model:
            return None
        return JSONResponse({"object": "error", "message": f"The model `{model}` does not exist.",
                             "type": "NotFoundError", "param": None, "code": 404}, status_code=404)


def learnt_engine(url: str, models: dict[str, str] | None = None) -> OpenAIEngine:
    """An engine without --backend-model (unless `models`): it learns the model from the backend's listing."""
    return OpenAIEngine(url, models=models, retries=4, backoff_initial=0.01, backoff_max=0.02, timeout=5.0,
                        first_token_timeout=5.0, idle_timeout=5.0)


async def runs(url: str, count: int, between: Callable[[int], None] = lambda _: None,
               models: dict[str, str] | None = None) -> list[Any]:
    """`count` runs one after the other of a learnt_engine (`between(i)` before the i-th): each one's pieces, or
    its EngineError."""
    engine = learnt_engine(url, models)
    results: list[Any] = []
    try:
        for i in range(count):
            between(i)
            out, error = await drain(engine)
            results.append(error if error is not None else out)
    finally:
        await engine.aclose()
    return results


def test_a_backend_restarted_with_another_model_is_listed_again() -> None:
    """The model learnt from /models was kept for the process's life. Old: after the backend restarted serving
    llama-v2, every run failed for good ("The model `llama-v1` does not exist.", permanent) until the worker
    restarted. Now the 404 naming the learnt model forgets it, and the next try lists the models again."""
    backend = Restarting("llama-v1")

    def restart(i: int) -> None:
        if i == 1:
            backend.model = "llama-v2"

    with ServerThread(backend.app()) as server:
        results = asyncio.run(runs(server.url, 3, restart))
    assert results == [["ok", Finish("stop")]] * 3, results  # old: runs 2 and 3 an EngineError (permanent)
    assert backend.chats == ["llama-v1", "llama-v1", "llama-v2", "llama-v2"], backend.chats
    assert backend.listings == 2, backend.listings


def test_a_listing_that_still_names_a_refused_model_keeps_the_refusal() -> None:
    """A backend whose listing still names the model it refuses has not changed models: the refusal is the
    request's, permanent at once, after one listing (the first form of the fix retried it --backend-retries
    times, listing each time)."""
    backend = Restarting("llama-v1")

    async def main() -> tuple[list[Any], EngineError | None]:
        engine = learnt_engine(server.url)
        engine._served_model = "gone"  # learnt before the restart
        backend.model, backend.listed = "other", "gone"
        try:
            return await drain(engine)
        finally:
            await engine.aclose()

    with ServerThread(backend.app()) as server:
        out, error = asyncio.run(main())
    assert out == [] and error is not None and not error.transient, error
    assert "does not exist" in str(error), error
    assert backend.chats == ["gone"] and backend.listings == 1, (backend.chats, backend.listings)


def test_a_probe_keeps_the_model_learnt_while_it_is_listed() -> None:
    """A re-probe of a backend that serves several models, whose listing changed order (`ollama pull qwen`):
    the model learnt is still served, and the group is routed by its name. The first form of the fix took the
    new first one: tenants asking for llama3 were answered by qwen."""
    backend = Several(["llama3:latest", "qwen:latest"])

    async def main() -> list[str]:
        engine = learnt_engine(server.url)
        try:
            await drain(engine)
            backend.listing = ["qwen:latest", "llama3:latest"]
            await engine.probe("default")
            await drain(engine)
            return backend.chats
        finally:
            await engine.aclose()

    with ServerThread(backend.app()) as server:
        chats = asyncio.run(main())
    assert set(chats) == {"llama3:latest"}, chats  # the probe's test request included


def test_a_model_removed_from_a_backend_that_serves_several_is_the_requests_refusal() -> None:
    """`ollama rm llama3` on a backend that also serves qwen: the 404 is the request's (as before the first form
    of the fix, which answered it with qwen, a model nobody chose)."""
    backend = Several(["llama3:latest", "qwen:latest"])

    async def main() -> tuple[list[Any], EngineError | None]:
        engine = learnt_engine(server.url)
        try:
            await drain(engine)
            backend.listing = ["qwen:latest"] + ["other:latest"]
            return await drain(engine)
        finally:
            await engine.aclose()

    with ServerThread(backend.app()) as server:
        out, error = asyncio.run(main())
    assert error is not None and not error.transient and "not found" in str(error), (out, error)
    assert backend.chats == ["llama3:latest", "llama3:latest"], backend.chats


def test_a_404_that_only_quotes_the_model_is_the_requests_own() -> None:
    """A gateway's 404 about its route, quoting the model inside other words: no listing, permanent at once (the
    first form of the fix retried it --backend-retries times, listing each time)."""
    async def chat(request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"error": {"message": f"no route for POST /v1/chat/completions (tenant policy "
                                                  f"'{body['model']}-free-tier' does not allow chat)"}},
                            status_code=404)

    backend = Restarting("llama")
    app = Starlette(routes=[Route("/v1/models", backend.models), Route("/v1/chat/completions", chat,
                                                                       methods=["POST"])])
    with ServerThread(app) as server:
        [error] = asyncio.run(runs(server.url, 1))
    assert isinstance(error, EngineError) and not error.transient, error
    assert backend.listings == 1, backend.listings  # the model learnt, no listing again


def test_a_configured_model_refused_stays_the_requests_failure() -> None:
    """--backend-model is the operator's: a 404 naming it is permanent at once, as before (no listing)."""
    backend = Restarting("llama-v2")
    with ServerThread(backend.app()) as server:
        [error] = asyncio.run(runs(server.url, 1, models={"*": "llama-v1"}))
    assert isinstance(error, EngineError) and not error.transient, error
    assert backend.chats == ["llama-v1"] and backend.listings == 0, (backend.chats, backend.listings)


def test_the_probe_lists_the_model_again() -> None:
    """The worker probes again a backend that went down (its runs got BackendDown): the model is listed again.
    Old: the probe's test request named the model learnt before the restart (llama-v1)."""
    backend = Restarting("llama-v1")

    async def main() -> tuple[str, str | None]:
        engine = learnt_engine(server.url)
        try:
            first = await engine.model_for("default")
            backend.model = "llama-v2"
            await engine.probe("default")
            return first, engine._served_model
        finally:
            await engine.aclose()

    with ServerThread(backend.app()) as server:
        first, after = asyncio.run(main())
    assert first == "llama-v1" and after == "llama-v2", (first, after)  # old: llama-v1 kept
    assert backend.chats and set(backend.chats) == {"llama-v2"}, backend.chats  # the probe's test request


def test_a_listing_whose_data_is_no_list_is_no_worker_error() -> None:
    """`{"data": 5}`: old: a TypeError escaped the run (a worker error with a traceback); now no model listed."""
    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": 5})

    with ServerThread(Starlette(routes=[Route("/v1/models", models)])) as server:
        [error] = asyncio.run(runs(server.url, 1))
    assert isinstance(error, EngineError) and "lists no model" in str(error), error


# ---- the prompt counted with the backend's tokenizer ---------------------------------------------------------------
IMAGE = "data:image/png;base64," + "QUJD" * 75_000  # 300 KB of base64


class CountingServer:
    """llama-cpp-python: no usage in its stream, `/extras/tokenize/count` (a token per word here)."""

    def __init__(self) -> None:
        self.counted: list[str] = []

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/extras/tokenize/count", self.count, methods=["POST"]),
                                 Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def count(self, request: Request) -> Response:
        text = (await request.json())["input"]
        self.counted.append(text)
        return JSONResponse({"count": len(text.split())})

    async def chat(self, _: Request) -> Response:
        return Response(chunk({"content": "a cat"}, "stop") + DONE, media_type="text/event-stream")


def counted_usage(messages: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    """A run of `messages` against a CountingServer: its Finish's usage, and the texts the server counted."""
    backend = CountingServer()
    run = replace(spec(8), input_text=json.dumps(messages))

    async def main() -> list[Any]:
        engine = OpenAIEngine(server.url, models={"*": "m"}, retries=1, timeout=5.0)
        engine.capabilities = Capabilities("llama-cpp-python", slots=1, streams_usage=False, counts_tokens=True,
                                           interrupts=True)
        try:
            return [piece async for piece in engine.stream(run, "")]
        finally:
            await engine.aclose()

    with ServerThread(backend.app()) as server:
        out = asyncio.run(main())
    assert isinstance(out[-1], Finish), out
    return out[-1].usage, backend.counted


def test_the_tokenizer_count_of_a_prompt_skips_an_images_base64() -> None:
    """Old: `str(content)` of the parts was counted, base64 and all (t5: 100031 prompt tokens against the
    estimate's 91). Now the text parts are counted, and PART_TOKENS (85) for the image, as the estimate does."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is in this picture?"},
                                             {"type": "image_url", "image_url": {"url": IMAGE}}]}]
    usage, counted = counted_usage(messages)
    assert not any("base64" in text or "image_url" in text for text in counted), [t[:80] for t in counted]
    assert "what is in this picture?" in counted, [t[:80] for t in counted]
    assert usage["prompt_tokens"] == 5 + PART_TOKENS and usage["completion_tokens"] == 2, usage  # old: 75003


def test_the_tokenizer_count_of_a_prompt_reads_tool_calls() -> None:
    """An assistant turn whose content is None and a tool call: its name and arguments are read (old: nothing of
    the call, the turn counted as an empty line)."""
    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    usage, counted = counted_usage(messages)
    prompt = next(text for text in counted if "weather in Paris?" in text)
    assert "get_weather" in prompt and '"Paris"}' in prompt and "sunny" in prompt, prompt
    assert usage["prompt_tokens"] == len(prompt.split()), (usage, prompt)


def test_the_estimate_and_the_tokenizer_count_walk_the_same_texts() -> None:
    """One walk (message_texts) for both: the estimate's characters are the texts the tokenizer is given."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "abcd" * 10}, {"type": "input_audio"}]},
                {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]
    texts = list(message_texts(messages))
    assert texts == ["abcd" * 10, None, "f", "{}"], texts
    assert estimate_message_tokens(messages) == (40 + 1 + 2) // 4 + PART_TOKENS


# ---- a continuation's echo and min_tokens ------------------------------------------------------------------------
def continuation_body(params: dict[str, Any], start_index: int, done: int | None = None,
                      continues: bool = True) -> dict[str, Any]:
    engine = OpenAIEngine("http://127.0.0.1:9/v1", models={"*": "m"})
    engine.capabilities = Capabilities("vllm", continues=True)
    run = replace(spec(10, start_index=start_index), params=params)
    return engine.body(run, "a b c d e f", "m", continues, done)


def test_a_continuation_drops_echo() -> None:
    """vLLM echoes the last message when `echo` is set, the assistant's output so far once add_generation_prompt
    is false: the tenant got its text twice (t6: 'a b ca b c d e'). Old: echo sent as the tenant's."""
    body = continuation_body({"echo": True, "temperature": 0.5}, start_index=3)
    assert body["continue_final_message"] is True and "echo" not in body, body  # old: echo True
    assert body["temperature"] == 0.5
    assert continuation_body({"echo": True}, start_index=0)["echo"] is True  # the first call: as sent
    assert continuation_body({"echo": True}, start_index=3, continues=False)["echo"] is True  # regenerated


@pytest.mark.parametrize(("least", "start_index", "done", "sent"),
                         [(8, 6, 6, 2), (8, 3, None, 5), (8, 6, 8, None), (8, 6, 9, None), (8.0, 6, 6, 2.0),
                          ("8", 6, 6, "8")])
def test_a_continuation_lowers_min_tokens_by_the_tokens_done(least: Any, start_index: int, done: int | None,
                                                             sent: Any) -> None:
    """min_tokens counts the call's own tokens, lowered by those done (the budget's: `done`, by default
    start_index), dropped at 0; a value no number is the backend's to refuse, as sent. Old: 8 sent with max_tokens
    4 (vLLM refuses a min above the max with a 400; another backend ran past the uninterrupted run)."""
    body = continuation_body({"min_tokens": least}, start_index=start_index, done=done)
    assert body.get("min_tokens") == sent, body  # old: 8
    assert body["max_tokens"] == 10 - (start_index if done is None else done)


def test_a_regenerated_or_first_call_keeps_min_tokens() -> None:
    assert continuation_body({"min_tokens": 8}, start_index=6, continues=False)["min_tokens"] == 8
    assert continuation_body({"min_tokens": 8}, start_index=0)["min_tokens"] == 8


# ---- a chunk whose choices are no list -------------------------------------------------------------------------
@pytest.mark.parametrize("choices", [1, True, False, 0, "abc", {"index": 0}])
def test_choices_that_are_no_list_are_a_broken_stream(choices: Any) -> None:
    """Old: a TypeError (`'int' object is not iterable`) escaped to the worker, which failed the request "worker
    error" with a traceback; a string or an object was skipped silently. Now a ValueError, as bad JSON."""
    with pytest.raises(ValueError, match="choices are not a list"):
        pieces_of({"choices": choices}, StreamState())


@pytest.mark.parametrize("chunk_body", [{}, {"choices": None}, {"choices": []}])
def test_choices_missing_null_or_empty_are_no_tokens(chunk_body: dict[str, Any]) -> None:
    state = StreamState()
    assert pieces_of({**chunk_body, "usage": {"prompt_tokens": 1}}, state) == [] and state.usage is not None


@pytest.mark.parametrize("bad", [b'{"choices": 1}', b'{"choices": true}'])
def test_choices_that_are_no_list_after_a_token_hand_the_run_back(bad: bytes) -> None:
    """After a token: a transient EngineError (the run resumes), not a worker error."""
    calls = Calls([CHUNKED_SSE + framed(chunk({"content": "a"}) + b"data: " + bad + b"\n\n")])
    out, error = asyncio.run(run_against(calls))
    assert out == ["a"] and error is not None and error.transient, (out, error)
    assert "after 1 tokens" in str(error) and "choices are not a list" in str(error), error


def test_choices_that_are_no_list_first_are_retried() -> None:
    """Before the first token: retried on the spot, as a stream cut short; the next try streams."""
    calls = Calls([CHUNKED_SSE + framed(b'data: {"choices": 1}\n\n'),
                   CHUNKED_SSE + framed(chunk({"content": "b"}, "stop") + DONE) + b"0\r\n\r\n"])
    out, error = asyncio.run(run_against(calls))
    assert error is None and out == ["b", Finish("stop")] and len(calls.bodies) == 2, (out, error, calls.bodies)


def test_a_tenants_n_predict_never_reaches_the_backend() -> None:
    """llama.cpp's server reads `n_predict` before `max_tokens`: a tenant's would override Sluicegate's budget
    (its --max-tokens-limit, the token quota's estimate, a continuation's remaining tokens). Old: sent as given."""
    for start_index in (0, 3):
        body = continuation_body({"n_predict": 100_000, "temperature": 0.5}, start_index=start_index)
        assert "n_predict" not in body and body["temperature"] == 0.5, body
        assert body["max_tokens"] == 10 - start_index
