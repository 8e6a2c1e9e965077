"""The floor relays of `bench ttft --modes floor,floor-one` (loadtest/floor_relay.py): two minimal processes
that cross the chat route's hops (front, Valkey, back, backend, and back again), or one that does the back's
job too. A floor is only a floor if each request really makes the whole trip: the first token that comes
back is the backend's own for that request, on kept connections, one request after another; and through
the one relay, the request and its first token are in Valkey before the client sees that token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import pytest
import redis

from sluicegate.loadtest.common import Component, free_port, scratch_server, sse_events, wait_http
from sluicegate.loadtest.floor_relay import floor_chain
from tests.fake_backend import FakeBackend, Script

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


async def trips(floor: str, direct: str, questions: list[str]) -> list[tuple[str, str, int, float, float]]:
    """Each question through the relays, then directly: the first tokens, the relayed answer's [DONE]s
    and both answers' seconds."""
    connector = aiohttp.TCPConnector(limit=1)  # one kept connection: answers must end cleanly
    async with aiohttp.ClientSession(connector=connector) as http:
        seen = []
        for question in questions:
            relayed, done, took = await first_content(http, floor, question)
            expected, _, direct_took = await first_content(http, direct, question)
            seen.append((relayed, expected, done, took, direct_took))
        return seen


async def refused(floor: str, body: dict[str, object]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.post(f"{floor}/v1/chat/completions", json=body) as response:
        return response.status, await response.text()


def sim_backend(port: int) -> Component:
    """20 ms between tokens: an answer's tail (60 ms after its first of 4 tokens) is easy to tell apart."""
    backend = Component("sim-backend", ["--port", str(port), "--sim-prefill-ms", "0",
                                        "--sim-tokens-per-second", "50"]).start()
    wait_http(f"http://127.0.0.1:{port}/v1/models", process=backend.process)
    return backend


@pytest.mark.parametrize("one_process", [False, True], ids=["floor", "floor-one"])
def test_each_request_gets_its_own_first_token_through_the_relays_and_ends_with_the_backends(
        one_process: bool) -> None:
    """Each first token is the backend's own for that request; each answer ends once the backend's has
    (not at its first token, which let the backend's tail overlap the next timed request); a backend
    that is gone is a 502, and one back again (on the same port: the kept connection is dead) serves."""
    port = free_port()
    direct = f"http://127.0.0.1:{port}"
    backend = sim_backend(port)
    try:
        with floor_chain(direct, one_process=one_process) as floor:
            questions = ["sluice", "gate", "sluice", "weir"]
            seen = asyncio.run(trips(floor, direct, questions))
            backend.stop()
            status, reason = asyncio.run(refused(floor, {"model": "sim"}))
            backend = sim_backend(port)
            again = asyncio.run(trips(floor, direct, questions))
    finally:
        backend.stop()
    for relayed, expected, done, took, direct_took in seen + again:
        assert relayed == expected and done == 1, seen
        assert took >= 0.5 * direct_took, (took, direct_took)  # the relayed answer lasts as long as the backend's
    assert len({relayed for relayed, *_ in seen}) > 1, seen  # the questions' answers differ: no mix-up hides
    assert status == 502 and "cannot connect" in reason, (status, reason)


def test_the_one_relay_keeps_a_request_before_its_backend_call_and_a_token_before_the_client_sees_it() -> None:
    """`floor-one` stands for a shape that keeps what it sends, as Sluicegate does: each request and each
    first token the client gets is in Valkey; a relay that may store the request but not the token (an
    ACL) sends no token, a 502 instead; and one that may store nothing never calls the backend."""
    port = free_port()
    direct = f"http://127.0.0.1:{port}"
    body = {"model": "sim", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "dam"}]}
    with contextlib.ExitStack() as stack:
        backend = sim_backend(port)
        stack.callback(backend.stop)
        server = scratch_server()
        stack.callback(server.stop)
        admin = stack.enter_context(redis.Redis.from_url(server.url))
        admin.execute_command("ACL", "SETUSER", "requests-only", "on", ">pw", "~floor:r:*", "+ping", "+set")
        admin.execute_command("ACL", "SETUSER", "nothing-kept", "on", ">pw", "+ping", "+set")
        fake = FakeBackend(models=["sim"], default=Script.text("never", "sent"))
        fake_url = stack.enter_context(fake.serve()).url.removesuffix("/v1")

        with floor_chain(direct, one_process=True, redis_url=server.url) as floor:
            seen = asyncio.run(trips(floor, direct, ["sluice", "gate", "weir"]))
        requests = [json.loads(admin.get(f"floor:r:{i}") or b"{}") for i in range(3)]
        tokens = [admin.get(f"floor:t:{i}") for i in range(3)]
        limited = f"redis://requests-only:pw@127.0.0.1:{server.port}"
        with floor_chain(direct, one_process=True, redis_url=limited) as floor:
            token_refused = asyncio.run(refused(floor, body))
        overwritten = json.loads(admin.get("floor:r:0") or b"{}")  # the new relay counts from 0 again
        stored = sorted(admin.scan_iter("floor:*"))
        nothing = f"redis://nothing-kept:pw@127.0.0.1:{server.port}"
        with floor_chain(fake_url, one_process=True, redis_url=nothing) as floor:
            request_refused = asyncio.run(refused(floor, body))
        called = fake.records
    for (relayed, expected, *_), request, token, question in zip(seen, requests, tokens, ["sluice", "gate", "weir"],
                                                                strict=True):
        assert relayed == expected and token is not None, (seen, tokens)
        assert json.loads(token.removeprefix(b"data: "))["choices"][0]["delta"]["content"] == relayed
        assert request["messages"][0]["content"] == question, requests
    assert token_refused[0] == 502 and "NOPERM" in token_refused[1], token_refused
    assert overwritten["messages"][0]["content"] == "dam", overwritten
    assert stored == [b"floor:r:0", b"floor:r:1", b"floor:r:2", b"floor:t:0", b"floor:t:1", b"floor:t:2"], stored
    assert request_refused[0] == 502 and "NOPERM" in request_refused[1], request_refused
    assert called == [], called  # the backend is called only once the request is kept
