"""A chat call whose status still waits when its API process gets SIGTERM (a deploy, a scale-down) is answered at
once with the stored request's 503 (its ids, `x-should-retry: false`), not uvicorn's plain 500 after its 5 s
graceful-shutdown timeout, which OpenAI's SDK retries: behind a load balancer, a second request generated again."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from tests.client_helpers import ApiProcess
from tests.helpers import Stack, call, fast_settings, wait_for

GRACEFUL_SHUTDOWN_SECONDS = 5  # uvicorn's timeout_graceful_shutdown (sluicegate/cli.py)


@pytest.mark.parametrize("stream", [False, True])
def test_a_waiting_chat_call_gets_the_stored_503_on_sigterm(redis_url: str, stream: bool) -> None:
    # A prefill longer than the test and no idle ping meanwhile: nothing tells how it goes before the SIGTERM,
    # so neither answer has started (streamed: first_news still waits; not streamed: whole_answer).
    settings = fast_settings(redis_url, sim_prefill_ms=20000.0, sse_ping_seconds=30.0)
    stack = Stack(settings).start(api=False, workers=1)
    api = ApiProcess(settings).start()
    try:
        assert api.proc is not None
        started = threading.Event()

        def chat() -> httpx.Response:
            started.set()
            return httpx.post(f"{api.base_url}/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": stream})

        with ThreadPoolExecutor(1) as pool:
            answer: Future[httpx.Response] = pool.submit(chat)
            started.wait(5)
            wait_for(lambda: call("GET", f"{api.base_url}/v1/admin/stats")[1]["running"] == 1, timeout=10,
                     what="the request to run (its prefill)")
            time.sleep(1.0)
            api.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            reply = answer.result(timeout=30)
            waited = time.monotonic() - signalled
        assert reply.status_code == 503, (reply.status_code, reply.headers, reply.text)  # old: uvicorn's 500
        assert reply.headers["x-should-retry"] == "false"
        assert "retry-after" not in reply.headers
        request_id = reply.headers["x-request-id"]
        assert reply.headers["x-session-id"]
        error = reply.json()["error"]
        assert error["type"] == "unavailable" and error["status"] == 503
        assert "shutting down" in error["message"] and f"/v1/requests/{request_id}/events" in error["message"]
        assert waited < GRACEFUL_SHUTDOWN_SECONDS  # answered on the signal, not cancelled at the timeout
    finally:
        api.stop(signal.SIGKILL)
        stack.stop()
