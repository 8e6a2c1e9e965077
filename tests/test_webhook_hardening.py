"""Callback hardening: a URL httpx refuses is 422 at the submit and, if stored anyway, fails its attempts like
any other error; a receiver's huge answer is not read; a forged signature with non-ASCII is just refused."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from sluicegate.sessions import keys
from sluicegate.webhooks.delivery import Delivery
from sluicegate.webhooks.signing import signature, verify
from tests.helpers import call, read_http_request, submit, wait_for
from tests.test_webhooks import delivered, start_stack, status
from tests.webhook_receiver import Receiver


def refusal(stack, session: str, url: str) -> str:
    """A submit with `url` as its callback_url: a 422 callback_not_allowed (asserted); its message."""
    code, reply = call("POST", f"{stack.base_url}/v1/sessions/{session}/requests",
                       {"prompt": "hi", "max_tokens": 2, "callback_url": url})
    assert code == 422 and reply["error"]["type"] == "callback_not_allowed", (url, code, reply)
    return reply["error"]["message"]


def test_a_callback_url_with_a_control_character_is_422(redis_url: str, r) -> None:
    """urlsplit drops \\t\\r\\n silently, so such a URL passed the host check; httpx refuses it at every send."""
    stack = start_stack(redis_url, delivery=False)
    try:
        # and a lone surrogate, valid JSON ("\\ud800") that httpx cannot encode (UnicodeEncodeError: was a 500)
        for url in ("http://127.0.0.1:9/hook\n", "http://127.0.0.1:9/h\tok", "http://127.0.0.1:9/\x7f",
                    "http://127.0.0.1:9/\ud800"):
            why = "a character UTF-8 cannot encode" if "\ud800" in url else "a control character"
            assert why in refusal(stack, "ctl", url), url
        assert not r.exists(keys.session_meta("ctl"))
        assert submit(stack.base_url, "ctl-ok", max_tokens=2, callback_url="http://127.0.0.1:9/a b")  # httpx quotes it
    finally:
        stack.stop()


def test_a_callback_url_with_a_leading_space_is_422(redis_url: str, r) -> None:
    """urlsplit drops leading spaces, so " http://127.0.0.1:P/hook" passed the host check as 127.0.0.1; httpx
    reads it as a relative URL (no host) and refused every attempt (UnsupportedProtocol). Old: 202, then the
    callback failed unsent after its attempts. The 422 names why (a Unicode space too)."""
    stack = start_stack(redis_url, delivery=False)
    try:
        for url in (" http://127.0.0.1:9/hook", "  http://127.0.0.1:9/hook", "\u00a0http://127.0.0.1:9/hook",
                    "\u3000http://127.0.0.1:9/hook"):
            message = refusal(stack, "sp", url)
            assert message.startswith("callback_url: starts with a space"), (url, message)
        assert not r.exists(keys.session_meta("sp"))
    finally:
        stack.stop()


def test_a_callback_url_with_trailing_or_inner_spaces_is_taken_and_delivered(redis_url: str) -> None:
    """A space at the end of the URL, or a Unicode one (NBSP, U+3000) in its path or query, is no reason to
    refuse it: httpx sends it percent-encoded and the receiver takes it. Old: 422 for any URL != url.strip()
    ("callback_url: an http(s) URL of at most 2048 characters", whatever the cause)."""
    receiver = Receiver().start()
    stack = start_stack(redis_url)
    try:
        paths = {"/trailing%20": "/trailing ", "/nbsp?note=caf%C3%A9%C2%A0": "/nbsp?note=caf\u00e9\u00a0",
                 "/%E6%96%87%E3%80%80": "/\u6587\u3000"}
        for sent in paths.values():
            code, reply = call("POST", f"{stack.base_url}/v1/sessions/sp-end/requests",
                               {"prompt": "hi", "max_tokens": 2, "callback_url": f"{receiver.url}{sent}"})
            assert code == 202, (sent, code, reply)
        for path in paths:
            wait_for(lambda path=path: receiver.to(path), timeout=20, what=f"the callback to {path}")
    finally:
        stack.stop()
        receiver.stop()


def test_a_chat_calls_callback_header_with_a_leading_space_is_sent(redis_url: str) -> None:
    """The chat route's X-Callback-Url: HTTP drops a header value's leading and trailing spaces, so the URL
    noted is the one without them, and it is delivered (no unsendable URL is stored by this route either)."""
    receiver = Receiver().start()
    stack = start_stack(redis_url)
    try:
        code, reply = call("POST", f"{stack.base_url}/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                           headers={"X-Callback-Url": f" {receiver.url}/chat "})
        assert code == 200, reply
        wait_for(lambda: receiver.to("/chat"), timeout=20, what="the chat call's callback")
    finally:
        stack.stop()
        receiver.stop()


def test_a_stored_url_httpx_refuses_fails_after_max_attempts(redis_url: str, r) -> None:
    """A URL stored before the submit check refused it: each attempt fails (httpx.InvalidURL does not escape the
    delivery task, which would leave the claim to its lease forever) and the bound on attempts applies."""
    receiver = Receiver().start()
    stack = start_stack(redis_url, delivery=False, webhook_max_attempts=2, webhook_backoff=0.05)
    try:
        rid = submit(stack.base_url, "ctl-stored", max_tokens=2, callback_url=f"{receiver.url}/hook")
        wait_for(lambda: status(stack, rid)["status"] == "done", what="the request's end")
        r.hset(keys.request(rid), "cb", f"{receiver.url}/hook\n")
        stack.start_service("webhooks", Delivery(stack.settings, poll_seconds=0.05).run)
        view = wait_for(lambda: delivered(stack, rid), timeout=8, what="the give-up")
        assert view["callback"]["status"] == "failed" and view["callback"]["attempts"] == 2, view["callback"]
        assert view["callback"]["last_error"].startswith("InvalidURL"), view["callback"]
        assert not receiver.received
    finally:
        stack.stop()
        receiver.stop()


class HugeAnswer:
    """Answers every POST `200` with a `size`-byte body, sent in 1 MB chunks; records how much it managed to
    send before the client closed, and whether it sent it all."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.finished = False
        self.ended = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        try:
            read_http_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.size)
            chunk = b"x" * (1 << 20)
            while self.sent < self.size:
                conn.sendall(chunk)
                self.sent += len(chunk)
            self.finished = True
        except OSError:
            pass  # the client closed without reading the rest
        finally:
            conn.close()
            self.ended.set()

    def stop(self) -> None:
        self.listener.close()


def test_a_huge_answer_is_delivered_without_being_read(redis_url: str) -> None:
    """Only the status counts: a receiver answering 200 with 50 MB has the callback delivered, and the client
    closes the connection long before the body is all sent (it used to be read whole into memory)."""
    size = 50 * (1 << 20)
    huge = HugeAnswer(size)
    stack = start_stack(redis_url, webhook_timeout=10.0)
    try:
        rid = submit(stack.base_url, "huge-1", max_tokens=2, callback_url=f"{huge.url}/hook")
        view = wait_for(lambda: delivered(stack, rid), what="the delivery")
        assert view["callback"]["status"] == "delivered" and view["callback"]["attempts"] == 1, view["callback"]
        assert huge.ended.wait(10), "the receiver is still sending: the client kept its connection open"
        assert not huge.finished and huge.sent < size // 2, (huge.sent, size)
    finally:
        stack.stop()
        huge.stop()


def test_post_returns_an_invalid_url_as_the_attempts_error(redis_url: str) -> None:
    """At the unit: `post` returns why the attempt failed instead of raising httpx.InvalidURL."""
    import asyncio

    from tests.test_webhooks import hook_settings

    delivery = Delivery(hook_settings(redis_url))

    async def go() -> str | None:
        try:
            async with httpx.AsyncClient(timeout=1, trust_env=False) as http:
                return await delivery.post(http, "http://127.0.0.1:9/hook\n", "r1", {"st": "done", "sid": "s"})
        finally:
            await delivery.redis.aclose()

    error = asyncio.run(go())
    assert error is not None and error.startswith("InvalidURL"), error


def test_verify_refuses_a_forged_non_ascii_signature() -> None:
    body, now = b'{"x": 1}', int(time.time())
    good = signature("s", body, now)
    assert verify("s", body, good)
    for forged in (f"t={now},v1=é" + "0" * 63, f"t={now},v1=\udcff", f"t={now},v1=☃"):
        assert verify("s", body, forged) is False


def test_verify_refuses_a_post_without_the_signature_header() -> None:
    """A receiver passes `request.headers.get(HEADER)`: None for an unsigned POST (was AttributeError)."""
    assert verify("s", b'{"x": 1}', None) is False
