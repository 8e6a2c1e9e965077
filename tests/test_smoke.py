"""The basic path: submit, stream to the end, status."""

from __future__ import annotations

from tests.helpers import Stack, call, sse, submit


def test_submit_stream_done(stack: Stack) -> None:
    rid = submit(stack.base_url, "s1", max_tokens=12)
    events = list(sse(stack.base_url, f"/v1/requests/{rid}/events"))
    names = [e.event for e in events]
    assert names[:2] == ["queued", "started"] and names[-1] == "done"
    assert [e.data["index"] for e in events if e.event == "token"] == list(range(12))
    code, status = call("GET", f"{stack.base_url}/v1/requests/{rid}")
    assert code == 200 and status["status"] == "done" and status["tokens"] == 12
