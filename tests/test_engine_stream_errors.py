"""The openai engine against errors and event shapes inside a 200 stream, served as exact bytes
(tests/test_openai_engine_streams.py's RawBackend): TGI's tagged errors, and SSE events whose data is
split over lines, empty, or not a chunk object."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.test_openai_engine_streams import DONE, RawBackend, chunk, finish_of, spec, stream

VALIDATION = ("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 5000 `inputs` "
              "tokens and 16 `max_new_tokens`")


def tgi_error(message: str) -> bytes:
    """An error as TGI (v3) sends it inside a 200 chat stream: every one tagged 422 (into_openai_event)."""
    return b"data: " + json.dumps({"error": {"message": message, "http_status_code": 422}}).encode() + b"\n\n"


@pytest.mark.parametrize("message", [VALIDATION, "Template error: unknown filter", "Tool error: no tool named x",
                                     "Missing template vatiable: tools"])
def test_a_tgi_request_error_in_its_stream_is_a_permanent_422_after_one_call(message: str) -> None:
    """Read as an untagged 500 it was retried `retries` times (then --max-attempts) and answered 502."""
    backend = RawBackend([tgi_error(message), DONE])
    out, error = asyncio.run(stream(backend, spec(max_tokens=5), retries=3))
    assert out == [] and error is not None
    assert error.transient is False, str(error)
    assert f"HTTP 422: {message}" in str(error), str(error)
    assert len(backend.bodies) == 1


@pytest.mark.parametrize(("message", "status"), [("Model is overloaded", 429),
                                                 ("Request failed during generation: CUDA error", 500),
                                                 ("Incomplete generation", 500)])
def test_a_tgi_overload_or_generation_failure_in_its_stream_is_transient(message: str, status: int) -> None:
    """TGI tags these 422 too: taken at its tag they would fail the request for good."""
    backend = RawBackend([tgi_error(message), DONE])
    out, error = asyncio.run(stream(backend, spec(max_tokens=5), retries=3))
    assert out == [] and error is not None
    assert error.transient is True, str(error)
    assert f"last error: HTTP {status}: {message}" in str(error), str(error)
    assert len(backend.bodies) == 3


def test_a_tgi_error_with_another_tag_is_taken_at_its_tag() -> None:
    body = b'data: {"error":{"message":"Model is overloaded","http_status_code":400}}\n\n'
    out, error = asyncio.run(stream(RawBackend([body, DONE]), spec(max_tokens=5), retries=2))
    assert error is not None and error.transient is False and "HTTP 400: Model is overloaded" in str(error)


def test_an_events_data_lines_are_joined_into_one_chunk() -> None:
    """SSE joins the `data:` lines of one event with a newline: one JSON document, read once (each line
    parsed alone was a JSON error, the stream retried then failed)."""
    split = (b'data: {"id":"c1","object":"chat.completion.chunk",\n'
             b'data:  "choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n')
    pieces = [split, b"data: {\"choices\":[{\"index\":0,\r\n", b"data: \"delta\":{\"content\":\"!\"},",
              b"\"finish_reason\":\"stop\"}]}\r\n\r\n", DONE]
    backend = RawBackend(pieces)
    out, error = asyncio.run(stream(backend, spec(max_tokens=5)))
    assert error is None, error
    assert out[:-1] == ["Hi", "!"] and finish_of(out).reason == "stop"


def test_an_event_with_empty_data_is_skipped() -> None:
    """A bare `data:` (a keep-alive some servers send) is an event with no data: not dispatched (SSE)."""
    pieces = [chunk({"content": "Hi"}), b"data:\n\n", b"data: \r\n\r\n", chunk({"content": "!"}, "stop"), DONE]
    out, error = asyncio.run(stream(RawBackend(pieces), spec(max_tokens=5)))
    assert error is None, error
    assert out[:-1] == ["Hi", "!"] and finish_of(out).reason == "stop"


@pytest.mark.parametrize("data", [b"null", b"[1, 2]", b"3"])
def test_data_that_is_not_a_chunk_object_is_a_transient_failure(data: bytes) -> None:
    """Valid JSON but no object raised a TypeError or AttributeError past the engine's own failures: the
    request failed for good as a "worker error". It is a broken stream, like bad JSON: retried."""
    backend = RawBackend([b"data: " + data + b"\n\n", DONE])
    out, error = asyncio.run(stream(backend, spec(max_tokens=5), retries=2))
    assert out == [] and error is not None and error.transient is True, error
    assert "not a chunk" in str(error) and len(backend.bodies) == 2
    after = RawBackend([chunk({"content": "Hi"}), b"data: " + data + b"\n\n", DONE])
    out, error = asyncio.run(stream(after, spec(max_tokens=5)))
    assert out == ["Hi"] and error is not None and error.transient is True, error
    assert "backend stream broke after 1 tokens" in str(error) and "not a chunk" in str(error)


@pytest.mark.parametrize("delta", [b'"oops"', b'{"content": 7}', b'{"content": ["a"]}', b"[1]"])
def test_a_chunk_whose_delta_or_content_is_not_text_is_a_transient_failure(delta: bytes) -> None:
    """A delta that is no object raised an AttributeError, a content that is no string went on as a token the
    writer failed on: both past the engine's own failures, the request failed for good as a "worker error"."""
    bad = b'data: {"choices":[{"index":0,"delta":' + delta + b'}]}\n\n'
    backend = RawBackend([bad, DONE])
    out, error = asyncio.run(stream(backend, spec(max_tokens=5), retries=2))
    assert out == [] and error is not None and error.transient is True, error
    assert "not text" in str(error) and len(backend.bodies) == 2
    out, error = asyncio.run(stream(RawBackend([chunk({"content": "Hi"}), bad, DONE]), spec(max_tokens=5)))
    assert out == ["Hi"] and error is not None and error.transient is True, error


def vllm_error(message: str) -> bytes:
    """vLLM's chat stream generator on any exception: create_streaming_error_response's defaults, a 400."""
    return b"data: " + json.dumps({"error": {"object": "error", "message": message, "type": "BadRequestError",
                                             "param": None, "code": 400}}).encode() + b"\n\n"


def test_an_error_a_backend_sends_after_its_first_token_is_transient_whatever_its_tag() -> None:
    """vLLM tags a dead engine's failure mid-stream a 400: taken at its tag, the run failed for good instead
    of resuming on another try or backend."""
    backend = RawBackend([chunk({"content": "Hi"}), vllm_error("Task finished unexpectedly."), DONE])
    out, error = asyncio.run(stream(backend, spec(max_tokens=5), retries=3))
    assert out == ["Hi"] and error is not None and error.transient is True, error
    assert "backend stream broke after 1 tokens" in str(error) and "HTTP 400: Task finished" in str(error)


def test_an_error_after_the_finish_reason_ends_the_run_finished() -> None:
    """The generation ended: an error where its usage or [DONE] should be cannot be resumed (it would append
    to a finished answer), so the run ends there, as when the stream breaks at that point."""
    backend = RawBackend([chunk({"content": "Hi"}, "stop"), vllm_error("usage failed"), DONE])
    out, error = asyncio.run(stream(backend, spec(max_tokens=5)))
    assert error is None, error
    assert out[:-1] == ["Hi"] and finish_of(out).reason == "stop"
