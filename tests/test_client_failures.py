"""The client and its commands where networks and people fail them: a stream whose connection vanished
while the server still counts it (429 on the reconnect, its Retry-After waited in full), a submit whose
answer was lost, a proxy's HTML error page, a session id no route can carry, arguments JSON cannot carry,
and `tail` started before its session's first request."""

from __future__ import annotations

import http.server
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from sluicegate.client import Client, Event, SluicegateError
from sluicegate.embedded import free_port
from tests.cutting_proxy import CuttingProxy
from tests.helpers import ROOT, Stack, call, fast_settings, run_sluicegate, submit

ADMIN = {"Authorization": "Bearer admin-secret"}


sg = run_sluicegate


@pytest.fixture
def auth_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret",
                                  sim_tokens_per_second=40.0)).start(workers=1)
    yield running
    running.stop()


def test_a_stream_whose_connection_vanished_waits_out_the_429_and_resumes(auth_stack: Stack) -> None:
    """max_streams 1: the server still counts the vanished connection, so the reconnect is refused (429,
    Retry-After) until the server sees it gone; the stream then resumes, no event lost or repeated."""
    base = auth_stack.base_url
    key = call("POST", f"{base}/v1/admin/keys", {"tenant": "acme"}, headers=ADMIN)[1]["key"]
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"max_streams": 1}, headers=ADMIN)[0] == 200
    proxy = CuttingProxy(auth_stack.port)
    refusals: list[str] = []
    events: queue.Queue[Event | BaseException] = queue.Queue()

    def follow() -> None:
        try:
            with Client(proxy.url, api_key=key) as client:
                for event in client.stream(session_id="vanished", reconnect_timeout=30,
                                           on_reconnect=lambda error, _: refusals.append(str(error))):
                    events.put(event)
                    if event.event == "done":
                        return  # the session's stream stays open: closed here, it holds no stop of the stack
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            events.put(error)

    # submitted first: a stream opened before the session exists is refused (404 "no session"), at once; the
    # session's stream starts at its oldest kept event, so the follower misses nothing by starting after
    code, sent = call("POST", f"{base}/v1/sessions/vanished/requests", {"prompt": "x", "max_tokens": 120},
                      headers={"Authorization": f"Bearer {key}"})  # 3 s of output
    assert code == 202, sent
    rid = sent["request_id"]
    threading.Thread(target=follow, daemon=True).start()
    got = [events.get(timeout=20) for _ in range(4)]
    proxy.vanish_clients()
    deadline = time.monotonic() + 20
    while not any("429" in r for r in refusals) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("429" in r for r in refusals), refusals  # refused while the server counts the vanished one
    proxy.release_vanished()  # the server sees it gone: the next try (after Retry-After) gets the stream
    while not (isinstance(got[-1], Event) and got[-1].event == "done"):
        got.append(events.get(timeout=30))
        assert not isinstance(got[-1], BaseException), got[-1]
    ids = [e.id for e in got if isinstance(e, Event)]
    assert ids == sorted(set(ids)) and ids == list(range(ids[0], ids[0] + len(ids)))  # none lost, none twice
    tokens = [e.index for e in got if isinstance(e, Event) and e.event == "token" and e.request_id == rid]
    assert tokens == list(range(120))
    proxy.close()


@dataclass
class HeldSeen:
    """What a HeldStream server saw (one per server)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    first_refusal: float | None = None
    refusals: int = 0
    cursors: list[str | None] = field(default_factory=list)


class HeldStream(http.server.BaseHTTPRequestHandler):
    """A request's stream whose first connection ends early; the reconnects get 429 `Retry-After: 2` until 2 s
    after the first of them (as the server does while it still counts the vanished connection), then the rest.
    What it saw is in `seen`, a fresh one per server (a subclass per test sets it)."""

    seen: HeldSeen

    def do_GET(self) -> None:
        seen = self.seen
        with seen.lock:
            seen.cursors.append(self.headers.get("Last-Event-ID"))
            if len(seen.cursors) == 1:
                self._stream(b'id: 1\nevent: queued\ndata: {"request_id": "r1"}\n\n')  # then closed: no `done`
                return
            now = time.monotonic()
            if seen.first_refusal is None or now - seen.first_refusal < 2.0:
                seen.first_refusal = seen.first_refusal or now
                seen.refusals += 1
                body = b'{"error": {"type": "tenant_limit", "message": "too many streams"}}'
                self.send_response(429)
                self.send_header("Retry-After", "2")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
        self._stream(b'id: 2\nevent: done\ndata: {"request_id": "r1", "tokens": 0}\n\n')

    def _stream(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def test_a_429s_retry_after_is_waited_in_full_whatever_max_backoff() -> None:
    """max_backoff bounds the client's own backoff, not the server's word: with max_backoff 0.1 the reconnect
    still waits the 2 s of Retry-After, so it is refused once, not again and again until the server lets go."""
    seen = HeldSeen()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Held", (HeldStream,), {"seen": seen}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    waits: list[tuple[str, float]] = []

    def reconnecting(error: Exception, wait: float) -> None:
        waits.append((str(error), wait))

    try:
        with Client(f"http://127.0.0.1:{server.server_address[1]}", max_backoff=0.1, reconnect_timeout=30) as client:
            got = [(e.event, e.id) for e in client.stream(request_id="r1", on_reconnect=reconnecting)]
    finally:
        server.shutdown()
        server.server_close()
    assert got == [("queued", 1), ("done", 2)]
    assert seen.refusals == 1, (seen.refusals, waits)
    assert [wait for error, wait in waits if "429" in error] == [2.0], waits
    assert seen.cursors[1:] == ["1", "1"]  # resumed after the event it had


def test_a_submit_whose_answer_was_lost_says_it_may_be_stored(stack: Stack) -> None:
    proxy = CuttingProxy(stack.port)
    proxy.drop_answers = True
    with Client(proxy.url) as client, pytest.raises(SluicegateError) as lost:
        client.submit("lost-answer", "hello", max_tokens=2)
    assert lost.value.status is None and lost.value.code == "no_answer"
    assert "may have taken effect" in lost.value.message
    with Client(stack.base_url) as client:  # it was stored: its events are there
        first = next(iter(client.stream(session_id="lost-answer")))
    assert first.event == "queued"
    proxy.close()
    with Client(f"http://127.0.0.1:{free_port()}") as client, pytest.raises(SluicegateError) as refused:
        client.submit("nowhere", "hello")
    assert refused.value.code == "unreachable"  # nothing was sent


class HtmlBadGateway(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<h1>502</h1>\r\n</body>\r\n"
                b"</html>\r\n")
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *_: object) -> None:
        pass


def test_a_proxys_html_error_page_is_one_line() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HtmlBadGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = sg("submit", "s1", "hi", "--url", f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "502" in result.stderr and "Bad Gateway" in result.stderr


def test_a_session_id_with_a_slash_is_refused_as_the_server_refuses_any_bad_id() -> None:
    with Client(f"http://127.0.0.1:{free_port()}") as client:  # nothing listens: a call would be `unreachable`
        with pytest.raises(SluicegateError) as refused:
            client.submit("a/b", "hi")
        assert (refused.value.status, refused.value.code) == (422, "invalid_request")
        with pytest.raises(SluicegateError):
            next(iter(client.stream(session_id="a/b")))
    result = sg("submit", "a/b", "hi", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "session_id: 1-128 characters" in result.stderr


@pytest.mark.parametrize("args", [
    ("weight", "acme", "nan"),
    ("quota", "default", "--burst", "inf"),
    ("quota", "default", "--burst", "many"),
    ("stats", "--interval", "nan"),
])
def test_an_argument_json_cannot_carry_is_a_usage_error(args: tuple[str, ...]) -> None:
    result = sg(*args, "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("args", [
    ("stats", "--url", "http://[::1"),
    ("submit", "s1", "caf\udce9", "--url", "http://127.0.0.1:9"),  # argv that is not UTF-8 (surrogateescape)
])
def test_input_that_cannot_be_sent_is_one_line_not_a_traceback(args: tuple[str, ...]) -> None:
    result = sg(*args)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "cannot send this" in result.stderr


def test_tail_waits_for_a_session_that_has_no_request_yet(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    tail = subprocess.Popen([sys.executable, "-m", "sluicegate", "tail", "not-yet", "--json", "--url", stack.base_url],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    said: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in tail.stdout or []], daemon=True).start()
    threading.Thread(target=lambda: [said.put(line) for line in tail.stderr or []], daemon=True).start()
    # it has asked and been told there is no such session yet (a fixed 1.5 s was less than a loaded host's start)
    assert "waiting for it" in said.get(timeout=30)
    assert tail.poll() is None  # still waiting
    rid = submit(stack.base_url, "not-yet", max_tokens=2)
    events = [json.loads(lines.get(timeout=20))]
    while events[-1]["event"] != "done":
        events.append(json.loads(lines.get(timeout=20)))
    tail.send_signal(signal.SIGINT)
    assert tail.wait(timeout=10) == 130
    assert [e["event"] for e in events][0] == "queued" and all(e["data"].get("request_id") == rid for e in events)
