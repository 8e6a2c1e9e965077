"""Session order: a session's requests run one at a time, in submission order, whatever the
number of workers and slots, while other sessions' requests run beside them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import SseEvent, Stack, call, fast_settings, sse, submit, wait_for

TERMINAL = ("done", "error", "cancelled")


@pytest.fixture
def wide_stack(redis_url: str) -> Iterator[Stack]:
    """Three 4-slot workers: plenty of free slots, so only the session rule keeps requests apart."""
    running = Stack(fast_settings(redis_url)).start(workers=3)
    yield running
    running.stop()


def session_events(base_url: str, sid: str, rids: list[str]) -> list[SseEvent]:
    pending = set(rids)

    def finished(event: SseEvent) -> bool:
        if event.event in TERMINAL:
            pending.discard(event.data["request_id"])
        return not pending

    return list(sse(base_url, f"/v1/sessions/{sid}/events", until=finished, timeout=60))


def assert_one_at_a_time_in_order(events: list[SseEvent], ran: list[str]) -> None:
    """`ran` started in this order, each only after the previous one's terminal event, and no
    event of a request falls outside its own started..terminal window (except its `queued`, and the
    `cancelled` of a request cancelled before it ran)."""
    starts = [e for e in events if e.event == "started"]
    assert [e.data["request_id"] for e in starts] == ran, "requests started out of submission order"
    assert not [e for e in events if e.event == "resumed"]
    window: dict[str, tuple[int, int]] = {}
    for rid in ran:
        start = next(e.id for e in events if e.event == "started" and e.data["request_id"] == rid)
        end = next(e.id for e in events if e.event in TERMINAL and e.data["request_id"] == rid)
        window[rid] = (start, end)
    for before, after in zip(ran, ran[1:], strict=False):
        assert window[after][0] > window[before][1], f"{after} started before {before} ended"
    for e in events:
        if e.event == "queued" or (e.event == "cancelled" and e.data["request_id"] not in window):
            continue
        start, end = window.get(e.data["request_id"], (None, None))
        assert start is not None and start <= e.id <= end, f"event {e} outside its request's run"


def overlaps(a: dict, b: dict) -> bool:
    return a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]


def test_one_session_runs_in_order_while_others_interleave(wide_stack: Stack) -> None:
    base = wide_stack.base_url
    # priorities vary on purpose: inside a session, submission order wins over priority
    plan = [("ordered", p) for p in (1, 9, 3, 7, 5, 0, 9, 2)]
    others = [(f"other-{k}", 5) for k in range(4)]
    submitted: dict[str, list[str]] = {}
    for i in range(len(plan)):
        for sid, priority in [plan[i], others[i % len(others)]]:
            rid = submit(base, sid, max_tokens=24, priority=priority, prompt=f"{sid} {i}")
            submitted.setdefault(sid, []).append(rid)
    for sid, rids in submitted.items():
        events = session_events(base, sid, rids)
        assert_one_at_a_time_in_order(events, rids)
        assert all(e.event == "done" for e in events if e.event in TERMINAL)
    views = {rid: call("GET", f"{base}/v1/requests/{rid}")[1] for rids in submitted.values() for rid in rids}
    ordered = [views[rid] for rid in submitted["ordered"]]
    assert all(v["status"] == "done" and v["tokens"] == 24 and v["attempts"] == 1 for v in views.values())
    # the ordered session's requests never overlap each other in time ...
    for a, b in zip(ordered, ordered[1:], strict=False):
        assert b["started_at"] >= a["finished_at"], "two requests of one session ran at the same time"
    # ... while other sessions' requests did run beside them (the slots were really parallel)
    concurrent = [o for sid in submitted if sid != "ordered" for o in (views[r] for r in submitted[sid])
                  if any(overlaps(o, a) for a in ordered)]
    assert concurrent, "no other session ran beside the ordered one: the test proves nothing"


@pytest.mark.parametrize("victim", ["queued", "running"])
def test_cancel_in_the_middle_keeps_the_rest_in_order(wide_stack: Stack, victim: str) -> None:
    base = wide_stack.base_url
    sid = f"cancel-{victim}"
    rids = [submit(base, sid, max_tokens=60, prompt=f"c{i}") for i in range(5)]
    if victim == "queued":
        target = rids[2]
        assert call("GET", f"{base}/v1/requests/{target}")[1]["status"] == "queued"
    else:
        target = rids[1]
        wait_for(lambda: call("GET", f"{base}/v1/requests/{target}")[1]["status"] == "running", timeout=20,
                 interval=0.005, what="the second request to run")
    code, view = call("DELETE", f"{base}/v1/requests/{target}")
    assert code == 200 and view["status"] == "cancelled", (code, view)
    events = session_events(base, sid, rids)
    ran = [rid for rid in rids if victim == "running" or rid != target]
    assert_one_at_a_time_in_order(events, ran)
    ends = {e.data["request_id"]: e.event for e in events if e.event in TERMINAL}
    assert ends == {rid: ("cancelled" if rid == target else "done") for rid in rids}
    tokens = [e.data["index"] for e in events if e.event == "token" and e.data["request_id"] == target]
    if victim == "queued":
        assert tokens == []
    else:
        assert tokens == list(range(len(tokens))) and len(tokens) < 60
    for rid in rids:
        if rid != target:
            assert [e.data["index"] for e in events if e.event == "token" and e.data["request_id"] == rid] == \
                list(range(60))
