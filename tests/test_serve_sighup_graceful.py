"""A closed terminal's SIGHUP (sent to serve's whole foreground process group) stops serve's API gracefully, as
Ctrl-C does: a `stream: true` chat still running ends with the shutdown's error object and `data: [DONE]`
(api/openai_routes.py ShutdownEnd), not cut. Serve's children run in process groups of their own, so the
signal reaches serve only and serve stops them with SIGTERM; the API has no SIGHUP handler, and the signal's
default action killed it at once (its stream truncated, which the SDK raises as a connection error)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.openai_helpers import ChatStream, chat_stream
from tests.test_serve_signals import end, wait_serving
from tests.test_serve_store_supervision import alive, descendants, start_serve

pytestmark = pytest.mark.own_servers


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_a_signal_to_serves_group_ends_a_running_chat_stream_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    log = tmp_path / "serve.log"
    proc, port = start_serve(tmp_path / "data", log)  # one sim worker at 50 tokens/s: 2000 tokens take 40 s
    started: list[int] = []
    sent: list[bool] = []

    def hang_up(_result: ChatStream, chunk: dict[str, Any]) -> None:
        if not sent and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            started.extend(descendants(proc.pid))
            os.killpg(proc.pid, sig)  # as a terminal does: to its foreground process group
            sent.append(True)

    try:
        wait_serving(proc, port, log)
        result = chat_stream(f"http://127.0.0.1:{port}", {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2000}, on_chunk=hang_up)
        assert sent, (result, log.read_text()[-3000:])
        assert result.status == 200 and result.content_chunks, result
        # old (SIGHUP): the API killed at once, the stream cut with no [DONE]
        assert result.done, (result.chunks[-3:], log.read_text()[-3000:])
        last = result.chunks[-1]
        assert "error" in last or last["choices"][0]["finish_reason"], last
        if "error" in last:
            assert last["error"]["message"].startswith("the API process is shutting down"), last
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        assert "api exited with code" not in log.read_text(), log.read_text()[-3000:]
        wait_for(lambda: not [p for p in started if alive(p)], timeout=10, what="serve's processes to end")
    finally:
        end(proc, started)
