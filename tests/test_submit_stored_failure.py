"""A native submit whose request is stored, then meets the store (Redis) failing while its callback is noted
(the second call of a push-mode submit, sessions/callbacks.py `attach`).

The plain 503 of a store that is down says to retry (`Retry-After: 1`): a client that did would store and
generate the request a second time while the first runs on. Once the request is stored, the answer is a 503
naming it, without Retry-After (api/requests_routes.py `callback_lost`). Real Valkey.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.helpers import Stack, call, wait_for
from tests.test_chat_stored_retry import fail_first_attach, requests_stored
from tests.test_webhooks import hook_settings


def test_a_store_failure_noting_the_callback_is_the_stored_requests_503(monkeypatch: pytest.MonkeyPatch,
                                                                        redis_url: str) -> None:
    session_id = "lost-callback"
    failed = fail_first_attach(monkeypatch)
    stack = Stack(hook_settings(redis_url)).start(workers=1)
    try:
        body = {"prompt": "hi", "max_tokens": 3, "callback_url": "http://127.0.0.1:9/hook"}
        submit = urllib.request.Request(f"{stack.base_url}/v1/sessions/{session_id}/requests", method="POST",
                                        data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(submit, timeout=30)
        answer = raised.value
        reply = json.loads(answer.read())
        assert failed, "the callback was never noted"
        request_id = failed[0]
        assert answer.code == 503 and answer.headers.get("Retry-After") is None, (answer.code, dict(answer.headers))
        assert answer.headers.get("X-Request-Id") == request_id
        assert reply["request_id"] == request_id and reply["events_url"] == f"/v1/requests/{request_id}/events"
        assert reply["error"]["type"] == "unavailable"
        assert "callback may not have been noted" in reply["error"]["message"]
        assert requests_stored(stack, session_id) == 1
        # It runs on (its callback not noted here: the failure came before the script ran).
        wait_for(lambda: call("GET", f"{stack.base_url}/v1/requests/{request_id}")[1]["status"] == "done", timeout=10)
    finally:
        stack.stop()
