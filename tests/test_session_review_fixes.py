"""A session's life across its TTL, as its clients see it: `sluicegate tail` waits for an expired session's
next use and follows that life from its first event (it exited 1 once events had been shown), while any
other refusal still ends it; and `?include=output` of a request kept past its session's TTL is null with an
output_error once the session id is used again (it was "" with no error)."""

from __future__ import annotations

import http.server
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import redis

from sluicegate.sessions import keys
from tests.helpers import ROOT, Stack, call, fast_settings, run_sluicegate, submit, wait_for


def status(base: str, rid: str) -> dict:
    return call("GET", f"{base}/v1/requests/{rid}")[1]


def lines_of(stream: object) -> queue.Queue[str | None]:
    """The stream's lines as they come, then None at its end."""
    got: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            got.put(line)
        got.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return got


def until(lines: queue.Queue[str | None], predicate: object, timeout: float = 15) -> list[str]:
    """Lines up to and including the first that `predicate` accepts; fails at the stream's end."""
    seen: list[str] = []
    while True:
        line = lines.get(timeout=timeout)
        assert line is not None, f"the stream ended: {seen}"
        seen.append(line)
        if predicate(line):  # type: ignore[operator]
            return seen


def test_tail_follows_a_session_into_its_next_life(redis_url: str, r: redis.Redis) -> None:
    """The old code exited 1 with the API's "no session" 404 once the followed session expired."""
    stack = Stack(fast_settings(redis_url, session_ttl=1)).start(workers=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    tail: subprocess.Popen[str] | None = None
    try:
        base = stack.base_url
        first = submit(base, "life", max_tokens=2)
        wait_for(lambda: status(base, first)["status"] == "done", timeout=15, what="the first request's end")
        tail = subprocess.Popen([sys.executable, "-m", "sluicegate", "tail", "life", "--json", "--url", base],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = lines_of(tail.stdout), lines_of(tail.stderr)
        shown = [json.loads(line) for line in until(out, lambda line: json.loads(line)["event"] == "done")]
        assert {e["data"]["request_id"] for e in shown} == {first}
        # the session expires (TTL 1 s); the server ends the stream and tail's reconnect finds no session
        said = until(err, lambda line: "expired; waiting for it" in line)
        assert not r.exists(keys.session_meta("life"))
        assert tail.poll() is None, said  # still following
        second = submit(base, "life", max_tokens=2)
        again = [json.loads(line) for line in until(out, lambda line: json.loads(line)["event"] == "done")]
        assert [e["id"] for e in again] == list(range(1, len(again) + 1))  # the next life, from its first event
        assert again[0]["event"] == "queued" and {e["data"]["request_id"] for e in again} == {second}
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=10) == 130
        said += [line for line in iter(lambda: err.get(timeout=10), None)]
        assert sum("expired" in line for line in said) == 1, said  # one notice, however long it waited
    finally:
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.wait()
        stack.stop()


# ---- a refusal other than the API's "no session" still ends tail, after events were shown too -----------
EVENT = (200, "text/event-stream", b'id: 3\nevent: queued\ndata: {"request_id": "r1"}\n\n')  # then the body ends


def api_error(status: int, code: str, message: str) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps({"error": {"code": code, "message": message}}).encode()


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next of `answers` (the last one again once they run out)."""

    answers: list[tuple[int, str, bytes]] = []
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        cls = type(self)
        code, kind, body = cls.answers[min(cls.hits, len(cls.answers) - 1)]
        cls.hits += 1
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[type[Scripted]]:
    handler = type("ScriptedHere", (Scripted,), {"answers": [], "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("refusal", [
    api_error(401, "unauthorized", "the API key was revoked"),
    api_error(404, "not_found", "no such endpoint"),  # a wrong URL's 404, not the session's
    api_error(404, "not_found", "no session 'other' (never used, or recycled after its TTL)"),  # another session's
    api_error(503, "unavailable", "the store is down"),  # the API down: retried until --reconnect-timeout
])
def test_tail_ends_on_any_other_refusal_after_events_were_shown(scripted: type[Scripted],
                                                                refusal: tuple[int, str, bytes]) -> None:
    scripted.answers = [EVENT, refusal]
    result = run_sluicegate("tail", "s1", "--json", "--reconnect-timeout", "1", "--url",
                            scripted.url, timeout=15)  # type: ignore[attr-defined]
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["id"] == 3
    assert "waiting for it" not in result.stderr and "expired" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"sluicegate tail: {refusal[0]} "), result.stderr


def test_tail_waits_out_the_no_session_answer_after_events_were_shown(scripted: type[Scripted]) -> None:
    """The same script, with the API's own "no session" answer: followed again from event id 0."""
    scripted.answers = [EVENT, api_error(404, "not_found", "no session 's1' (never used, or recycled after its TTL)"),
                        (200, "text/event-stream", b'id: 1\nevent: queued\ndata: {"request_id": "r2"}\n\n'),
                        api_error(401, "unauthorized", "the API key was revoked")]
    result = run_sluicegate("tail", "s1", "--json", "--url", scripted.url, timeout=15)  # type: ignore[attr-defined]
    assert result.returncode == 1, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [3, 1]
    assert "sluicegate tail: session 's1' expired; waiting for it" in result.stderr, result.stderr


# ---- polling mode -----------------------------------------------------------------------------------------
def test_output_of_a_request_kept_past_its_session_reused_is_an_error(redis_url: str, r: redis.Redis) -> None:
    """The old code answered "output": "" with no output_error: the new life's ids pass the bounds check,
    and every event of it is another request's."""
    stack = Stack(fast_settings(redis_url, session_ttl=1)).start(workers=1)
    try:
        base = stack.base_url
        first = submit(base, "reused", max_tokens=5)
        wait_for(lambda: status(base, first)["status"] == "done", timeout=15, what="the first request's end")
        assert r.pexpire(keys.request(first), 60_000)  # as a callback still being retried keeps its request
        wait_for(lambda: not r.exists(keys.session_meta("reused")), timeout=10, what="the session's expiry")
        second = submit(base, "reused", max_tokens=5)
        wait_for(lambda: status(base, second)["status"] == "done", timeout=15, what="the second request's end")
        code, view = call("GET", f"{base}/v1/requests/{first}?include=output")
        assert code == 200 and view["status"] == "done" and view["tokens"] == 5
        assert view["output"] is None and "used again" in (view.get("output_error") or ""), view
        code, view = call("GET", f"{base}/v1/requests/{second}?include=output")  # the new life's own: intact
        assert code == 200 and view["output"] and "output_error" not in view, view
    finally:
        stack.stop()
