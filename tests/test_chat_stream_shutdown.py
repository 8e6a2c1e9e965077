"""A streamed chat answer still running when its API process gets SIGTERM (a deploy, a scale-down) ends with an
error object naming the request's events URL, then `data: [DONE]`: not cut by uvicorn's transport close at its
graceful-shutdown timeout, an incomplete body the SDK raises as a bare connection error (and a caller told
nothing retries it: generated twice). The request runs on."""

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
