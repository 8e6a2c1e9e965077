"""The Python client's chat() against a real stack: a non-streamed chat waits for its answer however long
its request takes (the route writes nothing before it), a streamed one owns its connection (closed when
read to its end, closed, or dropped unread) and carries its request's ids, a call that waited for a free
connection of the pool was not sent, and an error answer carries its X-Request-Id. Real Valkey, real HTTP."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from sluicegate.client import AsyncClient, Client, SluicegateError
from tests.cutting_proxy import CuttingProxy
from tests.helpers import Stack, fast_settings

USER = [{"role": "user", "content": "tell me about sluice gates"}]


@pytest.fixture
def slow_stack(redis_url: str) -> Iterator[Stack]:
    """A sim engine at 10 tokens/s: a 12-token answer takes over a second."""
    running = Stack(fast_settings(redis_url, sim_tokens_per_second=10.0)).start(workers=1)
    yield running
    running.stop()


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_a_non_streamed_chat_longer_than_the_stream_read_timeout_gets_its_answer(slow_stack: Stack) -> None:
    """Nothing is written before the whole answer: the stream read timeout (meant for pinged SSE) would give
    up while the request runs on. With `chat_timeout` the caller bounds the wait, and gets `no_answer`."""
    with Client(slow_stack.base_url, stream_read_timeout=0.5) as client:
        answer = client.chat(USER, max_tokens=12)
        assert answer["usage"]["completion_tokens"] == 12 and answer["choices"][0]["finish_reason"] == "length"

    async def main() -> dict:
        async with AsyncClient(slow_stack.base_url, stream_read_timeout=0.5) as aclient:
            return await aclient.chat(USER, max_tokens=12)

    assert asyncio.run(main())["usage"]["completion_tokens"] == 12
    with Client(slow_stack.base_url, chat_timeout=0.3) as bounded, pytest.raises(SluicegateError) as caught:
        bounded.chat(USER, max_tokens=12)
    assert (caught.value.status, caught.value.code) == (None, "no_answer")


def test_streamed_chats_dropped_or_closed_unread_free_their_connections(stack: Stack) -> None:
    """Two connections at most: streamed chats dropped unread, closed, or left in a `with`, give their
    connection back (else the next call waits for the pool and fails)."""
    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=2))
    with Client(stack.base_url, timeout=2.0, transport=transport) as client:
        for _ in range(3):
            dropped = client.chat(USER, max_tokens=5, stream=True)
            del dropped
        gc.collect()
        assert client.chat(USER, max_tokens=3)["usage"]["completion_tokens"] == 3
        for _ in range(3):
            client.chat(USER, max_tokens=5, stream=True).close()
        for _ in range(3):
            with client.chat(USER, max_tokens=5, session_id="chat-with", stream=True) as chunks:
                first = next(chunks)
        assert first["object"] == "chat.completion.chunk"
        read = list(client.chat(USER, max_tokens=5, stream=True))
        assert read[-1]["choices"][0]["finish_reason"] == "length"
        assert client.chat(USER, max_tokens=3)["usage"]["completion_tokens"] == 3


def test_async_streamed_chats_dropped_or_closed_unread_free_their_connections(stack: Stack) -> None:
    async def main() -> tuple[dict, list[dict]]:
        transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=2))
        async with AsyncClient(stack.base_url, timeout=2.0, transport=transport) as aclient:
            for _ in range(3):
                dropped = await aclient.chat(USER, max_tokens=5, stream=True)
                del dropped
            gc.collect()
            await asyncio.sleep(0.2)  # the loop runs the finalizer of each dropped stream
            whole = await aclient.chat(USER, max_tokens=3)
            for _ in range(3):
                await (await aclient.chat(USER, max_tokens=5, stream=True)).aclose()
            for _ in range(3):
                async with await aclient.chat(USER, max_tokens=5, stream=True) as chunks:
                    await anext(chunks)
            parts = [c async for c in await aclient.chat(USER, max_tokens=5, stream=True)]
            return whole, parts

    whole, parts = asyncio.run(main())
    assert whole["usage"]["completion_tokens"] == 3 and parts[-1]["choices"][0]["finish_reason"] == "length"


def test_a_call_that_found_no_free_connection_was_not_sent(stack: Stack) -> None:
    """The pool's one connection held by an open chat stream: the next call waits for the pool, and
    nothing went out, so it is `unreachable` (not `no_answer`, which says it may have taken effect)."""
    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1))
    with Client(stack.base_url, timeout=0.5, transport=transport) as client:
        chunks = client.chat(USER, max_tokens=5, stream=True)
        with pytest.raises(SluicegateError) as caught:
            client.submit("not-sent", "hello", max_tokens=2)
        assert (caught.value.status, caught.value.code) == (None, "unreachable"), caught.value
        chunks.close()
        with pytest.raises(SluicegateError) as none:
            client.request("nope")
        assert none.value.code == "not_found"  # the stream closed: its connection is free again


def test_a_streamed_chat_carries_its_ids_and_a_cut_one_is_followed(slow_stack: Stack) -> None:
    """`request_id` and `session_id` of a streamed chat come from its headers; a cut one raises `no_answer`
    with the request's id, and stream(request_id=...) reads the rest of it."""
    proxy = CuttingProxy(slow_stack.port)
    try:
        with Client(proxy.url) as cut, Client(slow_stack.base_url) as client:
            chunks = cut.chat(USER, max_tokens=12, session_id="chat-ids", stream=True)
            assert chunks.session_id == "chat-ids" and chunks.request_id
            first = next(chunks)
            assert first["id"] == f"chatcmpl-{chunks.request_id}"
            proxy.vanish_clients()
            with pytest.raises(SluicegateError) as caught:
                list(chunks)
            assert (caught.value.code, caught.value.request_id) == ("no_answer", chunks.request_id)
            events = list(client.stream(request_id=chunks.request_id))
            assert events[-1].event == "done" and events[-1].data["tokens"] == 12

            async def ids() -> tuple[str | None, str | None, int]:
                async with AsyncClient(slow_stack.base_url) as aclient:
                    chat = await aclient.chat(USER, max_tokens=2, session_id="chat-aids", stream=True)
                    async with chat:
                        return chat.request_id, chat.session_id, len([c async for c in chat])

            request_id, session_id, count = asyncio.run(ids())
            assert session_id == "chat-aids" and count >= 2
            assert client.request(str(request_id))["status"] == "done"
    finally:
        proxy.close()


def test_an_error_answer_carries_its_request_id(slow_stack: Stack) -> None:
    """A chat cancelled while its caller waits is a 409 with `X-Request-Id`: the error's `request_id`; a
    streamed one cancelled midway ends with an error object, raised with that id too. An error with no such
    header (a 404 on a request) has None."""
    with Client(slow_stack.base_url) as client:
        errors: list[SluicegateError] = []

        def wait_for_answer() -> None:
            try:
                client.chat(USER, max_tokens=200, session_id="chat-cancelled")
            except SluicegateError as error:
                errors.append(error)

        waiting = threading.Thread(target=wait_for_answer)
        waiting.start()
        request_id = None
        for _ in range(100):  # the session exists once the chat's request is stored
            try:
                events = client.stream(session_id="chat-cancelled")
                request_id = next(events).request_id
                events.close()
                break
            except SluicegateError as error:
                assert error.status == 404, error
                time.sleep(0.05)
        assert request_id
        client.cancel(request_id)
        waiting.join(10)
        assert [(e.status, e.code, e.request_id) for e in errors] == [(409, "cancelled", request_id)]
        # A streamed chat cancelled midway: the error object in its 200 stream, with the request's id.
        chunks = client.chat(USER, max_tokens=200, stream=True)
        client.cancel(str(chunks.request_id))
        with pytest.raises(SluicegateError) as in_stream:
            list(chunks)
        assert (in_stream.value.code, in_stream.value.request_id) == ("cancelled", chunks.request_id), in_stream.value
        with pytest.raises(SluicegateError) as caught:
            client.request("nope")
        assert caught.value.status == 404 and caught.value.request_id is None
