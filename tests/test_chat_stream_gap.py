"""A chat stream whose reader fell so far behind that the session's log was trimmed past it ends with an error
object and `[DONE]`, not silently: an answer cut short that OpenAI's SDK would return as whole (no finish_reason,
no error) is an error it raises."""

from __future__ import annotations

import json
import socket

import httpx

from tests.helpers import Stack, fast_settings, wait_for

# Far more chunk bytes than the sockets' buffers hold (about 2 MB here), and than the log keeps (100 events).
TOKENS = 30000
READER_QUEUE = 8  # batches the stalled stream's hub reader holds before it overflows and reads the log (default 4096)


def dechunk(raw: bytes) -> bytes:
    """A chunked HTTP/1.1 body's content."""
    out, rest = [], raw
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        out.append(rest[:length])
        rest = rest[length + 2:]
    return b"".join(out)


def test_a_stream_whose_log_was_trimmed_past_it_ends_with_an_error(redis_url: str) -> None:
    settings = fast_settings(redis_url, session_log_max_events=100, sim_tokens_per_second=20000.0)
    stack = Stack(settings).start(workers=1)
    client = socket.socket()
    try:
        assert stack._server is not None
        # A small queue: the stalled reader overflows within a fast generation's few batches, not after 4096.
        stack._server.config.app.state.services.hub._reader_queue = READER_QUEUE
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: a small window
        client.connect(("127.0.0.1", stack.port))
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS,
                           "stream": True}).encode()
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:  # the head only (its request id); then no read while the request runs
            data += client.recv(256)
        status, *fields = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        assert status.startswith("HTTP/1.1 200"), status
        request_id = next(value.strip() for name, _, value in (field.partition(":") for field in fields)
                          if name.lower() == "x-request-id")
        wait_for(lambda: httpx.get(f"{stack.base_url}/v1/requests/{request_id}").json()["status"] == "done",
                 timeout=60, interval=0.1, what="the request to end, its log trimmed past the stalled reader")
        client.settimeout(30)
        while not data.endswith(b"\r\n0\r\n\r\n"):
            chunk = client.recv(65536)
            assert chunk, "the connection closed before the body's end"
            data += chunk
        events = dechunk(data.split(b"\r\n\r\n", 1)[1]).split(b"\n\n")
        assert events[-1] == b"", events[-3:]
        assert events[-2] == b"data: [DONE]", events[-3:]  # old: the body ended on a token chunk, no [DONE]
        error = json.loads(events[-3].removeprefix(b"data: "))["error"]
        assert error["type"] == "unavailable" and error["status"] == 503
        assert "trimmed" in error["message"] and f"/v1/requests/{request_id}/events" in error["message"]
        assert b'"finish_reason":"length"' not in data  # the end never came: the stream was cut short
    finally:
        client.close()
        stack.stop()
