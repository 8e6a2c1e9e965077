"""How the openai engine reads backend answers that are no generation: a backend not reached or not up
(BackendDown: its worker withdraws instead of failing the request), a `finish_reason: "abort"`, a vLLM engine
death tagged 400 in the stream, and credentials in --backend-url. Raw loopback servers, no Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sluicegate.embedded import free_port
from sluicegate.workers.engines.base import EngineError, Finish
from sluicegate.workers.engines.openai import OpenAIEngine
from tests.openai_helpers import ServerThread, read_posted_json
from tests.test_openai_engine_streams import DONE, SSE_200, chunk, spec

pytestmark = pytest.mark.single_server  # no Redis: once is enough


@dataclass
class Calls:
    """Answers the i-th POST with answers[i] (the last one again past the list): raw bytes, head included;
    b"" closes the connection before any answer. Records the request bodies."""

    answers: list[bytes]
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.bodies.append(await read_posted_json(reader))
            answer = self.answers[min(len(self.bodies), len(self.answers)) - 1]
            if answer:
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def sse(*pieces: bytes) -> bytes:
    return SSE_200 + b"".join(pieces)


def status(code: int, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message, "type": "unavailable_error"}}).encode()
    return (f"HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


def vllm_error(message: str, code: int = 400) -> bytes:
    """vLLM's in-stream error: any failure of its stream generator, tagged 400 BadRequestError."""
    error = {"error": {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": code}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"


async def run_against(calls: Calls | None, *, max_tokens: int = 8, retries: int = 3,
                      port: int | None = None) -> tuple[list[Any], EngineError | None]:
    """What the engine yields against `calls` (None: nothing listening on `port`), and its EngineError."""
    server = await asyncio.start_server(calls.answer, "127.0.0.1", 0) if calls else None
    port = server.sockets[0].getsockname()[1] if server else port
    engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", models={"*": "m"}, retries=retries, backoff_initial=0.01,
                          backoff_max=0.02, timeout=5.0, first_token_timeout=5.0, idle_timeout=5.0)
    out: list[Any] = []
    error: EngineError | None = None
    try:
        async for piece in engine.stream(spec(max_tokens), ""):
            out.append(piece)
    except EngineError as raised:
        error = raised
    finally:
        await engine.aclose()
        if server is not None:
            server.close()
            await server.wait_closed()
    return out, error


# ---- a backend not reached, or not up ---------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["refused", "503"])
def test_a_backend_not_reached_or_not_up_is_backend_down(answer: str) -> None:
    """Nothing listening, llama.cpp's 503 while it loads: BackendDown (old: a plain transient error, counted
    against the request's attempts)."""
    calls = {"refused": None, "503": Calls([status(503, "Loading model")])}[answer]
    out, error = asyncio.run(run_against(calls, port=free_port()))
    assert out == [] and error is not None and error.transient
    assert type(error).__name__ == "BackendDown", (type(error), error)
    if calls is not None:
        assert len(calls.bodies) == 3  # its quick retries first, as before


@pytest.mark.parametrize("answer", [status(500, "boom"), status(502, "bad gateway"),
                                    sse(chunk({"content": "A"}), b""), b""])
def test_a_backend_that_answered_fails_as_before(answer: bytes) -> None:
    """A 5xx other than 503, a stream cut after tokens, or a connection closed after the request was sent (the
    backend may have died of this very request: a poison prompt must use up its attempts, not wait and crash
    the backend again at each restart): the failure counts as before."""
    out, error = asyncio.run(run_against(Calls([answer])))
    assert error is not None and error.transient and type(error).__name__ != "BackendDown", error


def test_a_503_then_an_answer_is_served_in_the_same_attempt() -> None:
    calls = Calls([status(503, "Loading model"), sse(chunk({"content": "A"}, "stop"), DONE)])
    out, error = asyncio.run(run_against(calls))
    assert error is None and out == ["A", Finish("stop")] and len(calls.bodies) == 2


# ---- finish_reason abort ----------------------------------------------------------------------------------
def test_an_abort_before_the_first_token_is_retried() -> None:
    """SGLang's graceful abort (a weight update, abort_all) before any token: tried again (old: `done`, empty)."""
    aborted = sse(chunk({"role": "assistant", "content": ""}), chunk({}, "abort"), DONE)
    calls = Calls([aborted, sse(chunk({"content": "Hel"}), chunk({"content": "lo"}, "stop"), DONE)])
    out, error = asyncio.run(run_against(calls))
    assert error is None and out == ["Hel", "lo", Finish("stop")] and len(calls.bodies) == 2


def test_an_abort_after_tokens_breaks_the_stream() -> None:
    """After tokens: a transient failure (the run resumes), never a truncated answer ended `done`."""
    calls = Calls([sse(chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "abort"), DONE)])
    out, error = asyncio.run(run_against(calls, retries=1))
    assert out == ["Hel", "lo"], out  # old: ["Hel", "lo", Finish("abort")]
    assert error is not None and error.transient and "after 2 tokens" in str(error) and "abort" in str(error)


# ---- vLLM's engine death, tagged 400 ----------------------------------------------------------------------
@pytest.mark.parametrize("words", ["EngineCore encountered an issue. See stack trace (above) for the root cause.",
                                   "Engine loop has died", "EngineDeadError: engine died",
                                   "EngineGenerateError"])
def test_an_engine_death_tagged_400_in_the_stream_is_transient(words: str) -> None:
    calls = Calls([sse(vllm_error(words), DONE)])
    out, error = asyncio.run(run_against(calls))
    assert error is not None and error.transient, error  # old: "the backend refused the request: HTTP 400"
    assert len(calls.bodies) == 3 and "refused" not in str(error)


def test_an_engine_death_in_a_400_response_is_transient() -> None:
    calls = Calls([status(400, "EngineDeadError: EngineCore encountered an issue")])
    _, error = asyncio.run(run_against(calls))
    assert error is not None and error.transient and len(calls.bodies) == 3, error


@pytest.mark.parametrize("message", [
    "Invalid JSON schema for guided decoding: 'type' is required",
    # vLLM's validation errors echo the request: a prompt that names an engine death is no engine death
    "[{'type': 'missing', 'loc': ('body', 'x'), 'msg': 'Field required', 'input': {'messages': "
    "[{'role': 'user', 'content': 'why EngineDeadError?'}]}}]",
])
def test_a_genuine_400_in_the_stream_stays_permanent(message: str) -> None:
    calls = Calls([sse(vllm_error(message), DONE)])
    _, error = asyncio.run(run_against(calls))
    assert error is not None and not error.transient and len(calls.bodies) == 1, error


# ---- credentials in --backend-url -------------------------------------------------------------------------
def test_split_userinfo() -> None:
    from sluicegate.workers.engines.http1 import split_userinfo

    assert split_userinfo("http://h:1/v1") == ("http://h:1/v1", None)
    url, header = split_userinfo("https://us%3Aer:p%40ss@h:8/v1")
    assert url == "https://h:8/v1" and header == "Basic " + base64.b64encode(b"us:er:p@ss").decode()


def authed_app(expected: str, seen: list[tuple[str, str | None]], *, chat_status: int = 200) -> Starlette:
    async def chat(request: Request) -> Response:
        seen.append(("chat", request.headers.get("authorization")))
        if request.headers.get("authorization") != expected:
            return JSONResponse({"error": {"message": "unauthorized", "code": 401}}, status_code=401)
        if chat_status != 200:
            return JSONResponse({"error": {"message": "boom", "code": chat_status}}, status_code=chat_status)

        async def body() -> Any:
            yield b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
            yield b"data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        seen.append(("models", request.headers.get("authorization")))
        if request.headers.get("authorization") != expected:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return JSONResponse({"data": [{"id": "m"}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)])


async def chat_once(url: str, **options: Any) -> tuple[str, list[Any], EngineError | None]:
    engine = OpenAIEngine(url, retries=1, backoff_initial=0.01, **options)
    out: list[Any] = []
    error: EngineError | None = None
    try:
        model = await engine.model_for("default")
        async for piece in engine.stream(spec(5), ""):
            out.append(piece)
    except EngineError as raised:
        model, error = "", raised
    finally:
        await engine.aclose()
    return model, out, error


def test_credentials_in_the_backend_url_go_as_basic_auth_and_never_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """Every call sends them (old: the models listing did, the chat call did not: 401), and no log line or
    error message shows the password."""
    caplog.set_level(logging.INFO)
    expected = "Basic " + base64.b64encode(b"u:s3cret@x").decode()
    seen: list[tuple[str, str | None]] = []
    with ServerThread(authed_app(expected, seen)) as server:
        url = server.url.replace("http://", "http://u:s3cret%40x@")
        model, out, error = asyncio.run(chat_once(url))
    assert error is None and model == "m" and out == ["hi", Finish("stop")], error
    assert seen == [("models", expected), ("chat", expected)]
    seen.clear()
    with ServerThread(authed_app(expected, seen, chat_status=500)) as server:  # a failure logs the URL
        url = server.url.replace("http://", "http://u:s3cret%40x@")
        _, _, error = asyncio.run(chat_once(url, models={"*": "m"}))
    assert error is not None and "HTTP 500" in str(error) and seen == [("chat", expected)]
    assert "s3cret" not in caplog.text and "s3cret" not in str(error)
    assert f"127.0.0.1:{server.port}" in caplog.text  # the address is still logged, without its userinfo


def test_an_api_key_wins_over_credentials_in_the_url() -> None:
    seen: list[tuple[str, str | None]] = []
    with ServerThread(authed_app("Bearer k", seen)) as server:
        _, out, error = asyncio.run(chat_once(server.url.replace("http://", "http://u:p@"), api_key="k"))
    assert error is None and out == ["hi", Finish("stop")] and seen == [("models", "Bearer k"), ("chat", "Bearer k")]
