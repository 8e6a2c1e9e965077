"""The floor relays of `bench ttft --modes floor` (loadtest/floor_relay.py): two minimal processes that
cross the chat route's hops (front, Valkey, back, backend, and back again). The floor is only a floor if
each request really makes the whole trip: the first token that comes back is the backend's own for that
request, on kept connections, one request after another."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from sluicegate.loadtest.common import Component, free_port, sse_events, wait_http
from sluicegate.loadtest.floor_relay import floor_chain

pytestmark = pytest.mark.single_server  # its own Valkey and backend: once is enough


async def first_content(http: aiohttp.ClientSession, url: str, question: str) -> tuple[str, int]:
    body = {"model": "sim", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": question}]}
    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        texts, done = [], 0
        async for event in sse_events(response):
            if event.data == "[DONE]":
                done += 1
                break
            delta = json.loads(event.data)["choices"][0]["delta"]
            if delta.get("content"):
                texts.append(delta["content"])
    return texts[0], done


def test_each_request_gets_its_own_first_token_through_the_relays() -> None:
    port = free_port()
    backend = Component("sim-backend", ["--port", str(port), "--sim-prefill-ms", "0",
                                        "--sim-tokens-per-second", "1000"]).start()
    try:
        direct = f"http://127.0.0.1:{port}"
        wait_http(f"{direct}/v1/models", process=backend.process)
        with floor_chain(direct) as floor:
            async def trips() -> list[tuple[str, str, int]]:
                connector = aiohttp.TCPConnector(limit=1)  # one kept connection: answers must end cleanly
                async with aiohttp.ClientSession(connector=connector) as http:
                    seen = []
                    for question in ("sluice", "gate", "sluice", "weir"):
                        relayed, done = await first_content(http, floor, question)
                        expected, _ = await first_content(http, direct, question)
                        seen.append((relayed, expected, done))
                    return seen

            seen = asyncio.run(trips())
    finally:
        backend.stop()
    assert all(relayed == expected and done == 1 for relayed, expected, done in seen), seen
    assert len({relayed for relayed, _, _ in seen}) > 1, seen  # the questions' answers differ: no mix-up hides
