"""A submit whose answer from the store was lost twice (503 `maybe_stored`) still gets its callback noted
when the request was stored: the 503 tells the client to look before submitting again, and one that finds
the request stored must not wait for a callback that never comes. The 503 says which it is. Real Valkey;
the submit's call is made to store the request (or not) and then lose both answers, as a broken connection
does (tests/test_submit_lost_reply.py does it with a proxy, at the store's level)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from sluicegate.sessions.transitions import MaybeStored, Transitions
from sluicegate.webhooks.delivery import Delivery
from tests.helpers import Stack, call, fast_settings, wait_for
from tests.webhook_receiver import Receiver

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


@pytest.fixture
def stack(redis_url: str) -> Iterator[Stack]:
    settings = fast_settings(redis_url, webhook_allow="127.0.0.1", webhook_secret="s", webhook_backoff=0.2)
    running = Stack(settings).start(workers=1)
    running.start_service("webhooks", Delivery(running.settings, poll_seconds=0.05).run)
    yield running
    running.stop()


def lose_answers(monkeypatch: pytest.MonkeyPatch, *, stored: bool) -> None:
    """Every submit's call runs (`stored`) or not, and then raises as when both its answers were lost."""
    real = Transitions._submit_call

    async def lossy(self: Transitions, rid: str, name: str, keys_: Any, args: Any, on_sending: Any = None) -> Any:
        if stored:
            await real(self, rid, name, keys_, args, on_sending)
        raise MaybeStored(rid)

    monkeypatch.setattr(Transitions, "_submit_call", lossy)


def request_id(body: dict[str, Any]) -> str:
    return body["error"]["message"].split("/v1/requests/")[1].split(" ")[0]


def test_a_stored_submit_with_a_lost_answer_keeps_its_callback(stack: Stack, receiver: Receiver,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    lose_answers(monkeypatch, stored=True)
    code, body = call("POST", f"{stack.base_url}/v1/sessions/lost-cb/requests",
                      {"prompt": "x", "max_tokens": 3, "callback_url": f"{receiver.url}/native"})
    assert code == 503 and body["error"]["code"] == "maybe_stored", body
    rid = request_id(body)
    code, view = call("GET", f"{stack.base_url}/v1/requests/{rid}")
    assert code == 200 and view.get("callback", {}).get("url") == f"{receiver.url}/native", view
    assert "callback is noted and will be sent" in body["error"]["message"]
    wait_for(lambda: receiver.to("/native"), timeout=30, what="the callback")  # a cluster readies it by repair
    assert json.loads(receiver.to("/native")[0].body)["request_id"] == rid


def test_a_chat_call_with_a_lost_answer_keeps_its_callback(stack: Stack, receiver: Receiver,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    lose_answers(monkeypatch, stored=True)
    code, body = call("POST", f"{stack.base_url}/v1/chat/completions", CHAT,
                      headers={"X-Callback-Url": f"{receiver.url}/chat"})
    assert code == 503 and body["error"]["code"] == "maybe_stored", body
    code, view = call("GET", f"{stack.base_url}/v1/requests/{request_id(body)}")
    assert code == 200 and view.get("callback", {}).get("url") == f"{receiver.url}/chat", view
    assert "callback is noted and will be sent" in body["error"]["message"]


def test_a_lost_submit_that_was_not_stored_says_its_callback_was_not_noted(
        stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    lose_answers(monkeypatch, stored=False)
    code, body = call("POST", f"{stack.base_url}/v1/sessions/lost-none/requests",
                      {"prompt": "x", "max_tokens": 3, "callback_url": f"{receiver.url}/none"})
    assert code == 503 and body["error"]["code"] == "maybe_stored", body
    assert "callback_url was not noted" in body["error"]["message"]
    assert call("GET", f"{stack.base_url}/v1/requests/{request_id(body)}")[0] == 404  # attaching made nothing
    # No callback: the message is as it was.
    code, body = call("POST", f"{stack.base_url}/v1/sessions/lost-none/requests", {"prompt": "x", "max_tokens": 3})
    assert code == 503 and body["error"]["code"] == "maybe_stored" and "callback" not in body["error"]["message"]
