"""Helpers for the OpenAI-compatible tests: a real ASGI server in a thread, and an OpenAI SSE reader."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from sluicegate.embedded import free_port


class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1 in a background thread (its own event loop)."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL, as `--backend-url` takes it."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ServerThread:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="critical", access_log=False,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(15)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


@dataclass
class ChatStream:
    status: int
    headers: dict[str, str]
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # saw `data: [DONE]`
    body: Any = None  # the JSON body of a non-200 answer

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c.get("choices"))

    @property
    def content_chunks(self) -> list[dict[str, Any]]:
        return [c for c in self.chunks if c.get("choices") and c["choices"][0]["delta"].get("content")]


def chat_stream(base_url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
                path: str = "/v1/chat/completions", timeout: float = 30,
                on_chunk: Callable[[ChatStream, dict[str, Any]], None] | None = None) -> ChatStream:
    """POST a streamed chat completion and read every `data:` line until `[DONE]` or the end.

    `on_chunk(result, chunk)` runs as each chunk arrives (to act mid-stream, e.g. cancel)."""
    host, port = base_url.removeprefix("http://").split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("POST", path, body=json.dumps({**body, "stream": True}),
                           headers={"content-type": "application/json", **(headers or {})})
        response = connection.getresponse()
        result = ChatStream(response.status, {k.lower(): v for k, v in response.getheaders()})
        if response.status != 200:
            result.body = json.loads(response.read() or b"null")
            return result
        while True:
            try:
                line = response.readline()
            except http.client.IncompleteRead:  # the server cut the stream short
                return result
            if not line:
                return result
            text = line.decode().rstrip("\r\n")
            if not text.startswith("data:"):
                continue
            payload = text[5:].strip()
            if payload == "[DONE]":
                result.done = True
                return result
            result.chunks.append(json.loads(payload))
            if on_chunk is not None:
                on_chunk(result, result.chunks[-1])
    finally:
        connection.close()


async def read_posted_json(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The JSON body of the request a raw loopback server is reading (head, then content-length bytes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return json.loads(await reader.readexactly(length))  # type: ignore[no-any-return]
