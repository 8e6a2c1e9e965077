"""A stream's last chunk (its terminal event) goes out with the end of the body: one ASGI message, so one
socket write for the server and one read for the client, where the end used to follow it on its own.
Recorded on the real app, between uvicorn and the app, for every route that streams a request."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluicegate.api.responses import EventStreamResponse, LastChunk
from tests.helpers import Stack, submit

PROJECT = str(Path(__file__).resolve().parent.parent)  # the project's own generators, not its libraries'


@pytest.fixture
def recorded(stack: Stack) -> Iterator[dict[str, list[list[dict[str, Any]]]]]:
    """The body messages the app sends, by path and request, on the connections opened from now on."""
    by_path: dict[str, list[list[dict[str, Any]]]] = {}
    config = stack._server.config  # noqa: SLF001 (uvicorn gives each new connection config.loaded_app)
    app = config.loaded_app

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        sent: list[dict[str, Any]] = []
        by_path.setdefault(scope["path"], []).append(sent)

        async def send_recorded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                sent.append(message)
            await send(message)

        await app(scope, receive, send_recorded)

    config.loaded_app = recording
    yield by_path
    config.loaded_app = app


def read(stack: Stack, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    host, port = stack.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=json.dumps(body) if body else None,
                           headers={"content-type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        return response.read()  # to the end of the chunked body
    finally:
        connection.close()


def test_the_terminal_event_and_the_end_of_the_body_are_one_message(
        stack: Stack, recorded: dict[str, list[list[dict[str, Any]]]]) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    streamed = read(stack, "POST", "/v1/chat/completions", {**chat, "stream": True})
    whole = read(stack, "POST", "/v1/chat/completions", chat)
    rid = submit(stack.base_url, "writes-1", max_tokens=3)
    events = read(stack, "GET", f"/v1/requests/{rid}/events")

    assert streamed.endswith(b"data: [DONE]\n\n") and json.loads(whole)["choices"][0]["finish_reason"] == "length"
    assert b"event: done" in events
    chat_streamed, chat_whole = recorded["/v1/chat/completions"]
    (events_read,) = recorded[f"/v1/requests/{rid}/events"]
    for messages, last in ((chat_streamed, b"data: [DONE]\n\n"), (chat_whole, whole), (events_read, b"event: done")):
        assert all(m["body"] for m in messages), "no empty message just to end the body"
        assert [m.get("more_body", False) for m in messages] == [True] * (len(messages) - 1) + [False]
        assert last in messages[-1]["body"]


def test_a_finished_stream_leaves_no_generator_to_the_garbage_collector(stack: Stack) -> None:
    """A response leaves its events at the terminal one (the last chunk): the generators it read from
    are closed then, not left to the garbage collector, whose finalizer costs a task and a loop wake-up
    per request and leaves the session's hub later. Recorded with asyncio's hook, in the app's thread."""
    finalized: list[str] = []

    async def install() -> Any:
        hooks = sys.get_asyncgen_hooks()

        def finalizer(generator: Any) -> None:
            where = generator.ag_code.co_filename
            if where.startswith(PROJECT) and "site-packages" not in where:
                finalized.append(generator.__qualname__)
            hooks.finalizer(generator)

        sys.set_asyncgen_hooks(hooks.firstiter, finalizer)
        return hooks

    async def settle_and_restore(hooks: Any) -> None:
        gc.collect()
        await asyncio.sleep(0.05)
        sys.set_asyncgen_hooks(*hooks)

    hooks = stack._call(install())  # noqa: SLF001 (the hooks are the loop thread's)
    try:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        read(stack, "POST", "/v1/chat/completions", {**chat, "stream": True})
        read(stack, "POST", "/v1/chat/completions", chat)
        rid = submit(stack.base_url, "writes-gc", max_tokens=3)
        assert b"event: done" in read(stack, "GET", f"/v1/requests/{rid}/events")
        time.sleep(0.2)  # the worker's side of the runs has ended too
    finally:
        stack._call(settle_and_restore(hooks))  # noqa: SLF001
    assert finalized == []


def test_a_session_stream_never_ends_its_body_early(stack: Stack) -> None:
    """A session's stream has no terminal event: its chunks are never the last one, and it stays open."""
    rid = submit(stack.base_url, "writes-2", max_tokens=2)
    host, port = stack.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=0.2) as sock:
        sock.sendall(b"GET /v1/sessions/writes-2/events?after=0 HTTP/1.1\r\nhost: x\r\n\r\n")
        seen, done_at = b"", None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (done_at is None or time.monotonic() < done_at + 1.0):
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            assert data, "the session's stream was closed"
            seen += data
            if done_at is None and b"event: done" in seen:  # then a second more: pings at most, still open
                done_at = time.monotonic()
        assert done_at is not None and rid.encode() in seen
        assert b"\r\n0\r\n\r\n" not in seen


def test_a_last_chunk_ends_the_body_and_closes_the_stream() -> None:
    closed: list[bool] = []

    async def chunks() -> Any:
        try:
            yield b"a"
            yield LastChunk(b"b")
            yield b"never sent"
        finally:
            closed.append(True)

    async def run() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            return {}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await EventStreamResponse(chunks(), headers={})({"type": "http"}, receive, send)
        return sent

    sent = asyncio.run(run())
    assert [(m.get("body"), m.get("more_body")) for m in sent[1:]] == [(b"a", True), (b"b", False)]
    assert closed == [True]
