"""A resumed run whose continuation the backend refuses (llama.cpp: "Assistant response prefill is
incompatible with enable_thinking", or an assistant turn already last): the continued call is Sluicegate's
own, not the request the backend took on the first attempt, so its refusal must not fail the request as the
tenant's. The attempt generates the whole output again and skips what was streamed. Exact bytes from a raw
server (tests/test_openai_engine_streams.py); the engine runs in-process."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tests.test_openai_engine_streams import DONE, RawBackend, chunk, finish_of, spec, stream

REFUSED = b'{"error":{"code":400,"message":"Assistant response prefill is incompatible with enable_thinking."}}'
REFUSAL = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
           + str(len(REFUSED)).encode() + b"\r\nconnection: close\r\n\r\n" + REFUSED)


@dataclass
class RefusesPrefill(RawBackend):
    """Refuses a call that asks it to continue an assistant message; streams `pieces` for any other."""

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
        if b'"continue_final_message":true' not in body:
            await self.reply(head, body, writer)
            return
        self.bodies.append({"refused": True})
        writer.write(REFUSAL)
        await writer.drain()
        writer.close()

    async def reply(self, head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        """RawBackend's answer to a request already read: fed back to it through a reader of its own."""
        again = asyncio.StreamReader()
        again.feed_data(head + body)
        again.feed_eof()
        await RawBackend.answer(self, again, writer)


def test_a_refused_continuation_generates_the_output_again_and_skips_what_was_streamed() -> None:
    pieces = [chunk({"content": "a"}), chunk({"content": "b"}), chunk({"content": "c"}), chunk({"content": "d"}),
              chunk({"content": "e"}, "stop"), DONE]
    backend = RefusesPrefill(pieces)
    out, error = asyncio.run(stream(backend, spec(max_tokens=5, start_index=3), "abc", continues=True))
    assert error is None, error
    assert out[:-1] == ["d", "e"] and finish_of(out).reason == "stop"
    refused, regenerated = backend.bodies
    assert refused == {"refused": True}
    assert regenerated["max_tokens"] == 5 and regenerated["messages"][-1]["role"] == "user"


def test_a_refused_first_call_is_still_the_requests_own_refusal() -> None:
    """Only a continuation is tried again: a first attempt refused is the request's fault, as before."""
    backend = RawBackend([], head=REFUSAL)
    out, error = asyncio.run(stream(backend, spec(max_tokens=5), continues=True))
    assert out == [] and error is not None and error.transient is False
    assert "refused the request" in str(error) and len(backend.bodies) == 1
