"""The floor relays of `bench ttft --modes floor` (loadtest/floor_relay.py): two minimal processes that
cross the chat route's hops (front, Valkey, back, backend, and back again). The floor is only a floor if
each request really makes the whole trip: the first token that comes back is the backend's own for that
request, on kept connections, one request after another."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from sluicegate.loadtest.common import Component, free_port, sse_events, wait_http
from sluicegate.loadtest.floor_relay import floor_chain

pytestmark = pytest.mark.single_server  # its own Valkey and backend: once is enough


async def first_content(http: aiohttp.ClientSession, url: str, question: str) -> tuple[str, int, float]:
    """The answer's first token, how many [DONE] it ended with, and the seconds it took to its end."""
    body = {"model": "sim", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": question}]}
    started = time.perf_counter()
    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        texts, done = [], 0
        async for event in sse_events(response):
            if event.data == "[DONE]":
                done += 1
                continue
            delta = json.loads(event.data)["choices"][0]["delta"]
            if delta.get("content"):
                texts.append(delta["content"])
    return texts[0], done, time.perf_counter() - started


def sim_backend(port: int) -> Component:
    """20 ms between tokens: an answer's tail (60 ms after its first of 4 tokens) is easy to tell apart."""
    backend = Component("sim-backend", ["--port", str(port), "--sim-prefill-ms", "0",
                                        "--sim-tokens-per-second", "50"]).start()
    wait_http(f"http://127.0.0.1:{port}/v1/models", process=backend.process)
    return backend


def test_each_request_gets_its_own_first_token_through_the_relays_and_ends_with_the_backends() -> None:
    """Each first token is the backend's own for that request; each answer ends once the backend's has
    (not at its first token, which let the backend's tail overlap the next timed request); a backend
    that is gone is a 502, and one back again (on the same port: the kept connection is dead) serves."""
    port = free_port()
    direct = f"http://127.0.0.1:{port}"
    backend = sim_backend(port)
    try:
        with floor_chain(direct) as floor:
            async def trips() -> list[tuple[str, str, int, float, float]]:
                connector = aiohttp.TCPConnector(limit=1)  # one kept connection: answers must end cleanly
                async with aiohttp.ClientSession(connector=connector) as http:
                    seen = []
                    for question in ("sluice", "gate", "sluice", "weir"):
                        relayed, done, took = await first_content(http, floor, question)
                        expected, _, direct_took = await first_content(http, direct, question)
                        seen.append((relayed, expected, done, took, direct_took))
                    return seen

            async def refused() -> tuple[int, str]:
                async with aiohttp.ClientSession() as http, http.post(f"{floor}/v1/chat/completions",
                                                                      json={"model": "sim"}) as response:
                    return response.status, await response.text()

            seen = asyncio.run(trips())
            backend.stop()
            status, reason = asyncio.run(refused())
            backend = sim_backend(port)
            again = asyncio.run(trips())
    finally:
        backend.stop()
    for relayed, expected, done, took, direct_took in seen + again:
        assert relayed == expected and done == 1, seen
        assert took >= 0.5 * direct_took, (took, direct_took)  # the relayed answer lasts as long as the backend's
    assert len({relayed for relayed, *_ in seen}) > 1, seen  # the questions' answers differ: no mix-up hides
    assert status == 502 and "cannot connect" in reason, (status, reason)
