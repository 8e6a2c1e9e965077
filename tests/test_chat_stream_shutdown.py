"""A streamed chat answer still running when its API process's graceful shutdown is about to run out (a deploy, a
scale-down: SIGTERM) ends with an error object naming the request's events URL, then `data: [DONE]`: not cut by
uvicorn's transport close at its graceful-shutdown timeout, an incomplete body the SDK raises as a bare
connection error (and a caller told nothing retries it: generated twice). The request runs on. An answer that
ends within the grace goes out whole: a chat client cannot resume a stream ended early."""

from __future__ import annotations

import signal
from typing import Any

from tests.client_helpers import ApiProcess
from tests.helpers import Stack, call, fast_settings, wait_for
from tests.openai_helpers import ChatStream, chat_stream

MAX_TOKENS = 4000  # 10 s at the sim's 400 tokens/s: far longer than the test's wait for the stream's end


def test_a_running_chat_stream_ends_with_an_error_object_on_sigterm(redis_url: str) -> None:
    settings = fast_settings(redis_url)
    stack = Stack(settings).start(api=False, workers=1)
    api = ApiProcess(settings).start()
    try:
        assert api.proc is not None
        proc = api.proc

        def on_chunk(result: ChatStream, _: dict[str, Any]) -> None:
            if len(result.content_chunks) == 3:  # running, its answer begun
                proc.send_signal(signal.SIGTERM)

        result = chat_stream(api.base_url, {"messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": MAX_TOKENS}, on_chunk=on_chunk, timeout=30)
        assert result.status == 200, result.body
        request_id = result.headers["x-request-id"]
        assert result.done, result.chunks[-1:]  # old: cut by uvicorn at 5 s, no [DONE]
        error = result.chunks[-1]["error"]
        assert error["type"] == "unavailable" and error["status"] == 503 and error["code"] == "unavailable"
        assert "shutting down" in error["message"] and f"/v1/requests/{request_id}/events" in error["message"]
        assert 3 <= len(result.content_chunks) < MAX_TOKENS  # the answer's beginning, then the error
        proc.wait(30)
        # the request ran on: another API process shows it running or done
        api.proc = None
        api.start()
        code, status = call("GET", f"{api.base_url}/v1/requests/{request_id}")
        assert code == 200 and status["status"] in ("running", "done"), status
        wait_for(lambda: call("GET", f"{api.base_url}/v1/requests/{request_id}")[1]["status"] == "done",
                 timeout=30, what="the request to run to its end")
    finally:
        api.stop(signal.SIGKILL)
        stack.stop()


def test_a_chat_stream_that_ends_within_the_grace_goes_out_whole_after_sigterm(redis_url: str) -> None:
    settings = fast_settings(redis_url)
    stack = Stack(settings).start(api=False, workers=1)
    api = ApiProcess(settings).start()
    short = 600  # 1.5 s at the sim's 400 tokens/s: well within the 5 s grace
    try:
        assert api.proc is not None
        proc = api.proc

        def on_chunk(result: ChatStream, _: dict[str, Any]) -> None:
            if len(result.content_chunks) == 3:
                proc.send_signal(signal.SIGTERM)

        result = chat_stream(api.base_url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": short},
                             on_chunk=on_chunk, timeout=30)
        assert result.status == 200, result.body
        assert result.done and "error" not in result.chunks[-1], result.chunks[-1:]  # before: cut at once, 503
        assert len(result.content_chunks) == short
        proc.wait(30)
    finally:
        api.stop(signal.SIGKILL)
        stack.stop()
