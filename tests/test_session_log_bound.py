"""Bounded session logs (--session-log-max-events): a busy session's log keeps the newest N events, a
resume from a trimmed cursor is a 409 that names the oldest kept id, and the running request's own
events are never trimmed (a preempted request still resumes from its tokens)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.settings import Settings
from sluicegate.workers.engines.sim import sim_text
from tests.helpers import SseEvent, Stack, call, fast_settings, sse, submit, wait_for
from tests.worker_helpers import token_indices, token_text

CAP = 100


@pytest.fixture
def capped(redis_url: str) -> Iterator[Stack]:
    """API, scheduler and one 1-slot sim worker; session logs capped at CAP events; no run quantum."""
    running = Stack(fast_settings(redis_url, session_log_max_events=CAP, slots=1, preempt_min_run_ms=0.0)).start()
    yield running
    running.stop()


def wait_done(r: redis.Redis, rids: list[str], timeout: float = 30) -> None:
    wait_for(lambda: all(r.hget(keys.request(rid), "st") == "done" for rid in rids), timeout=timeout,
             what=f"{len(rids)} requests done")


def log_ids(r: redis.Redis, sid: str) -> list[int]:
    return [int(entry.split("|", 1)[0]) for entry in r.lrange(keys.session_log(sid), 0, -1)]


def meta(r: redis.Redis, sid: str) -> tuple[int, int]:
    seq, base = r.hmget(keys.session_meta(sid), ["seq", "base"])
    return int(seq), int(base or 1)


def fill(stack: Stack, r: redis.Redis, sid: str, *, rounds: int, per_round: int = 3, tokens: int = 20) -> None:
    """Busy session: rounds of requests (each emits tokens + 3 events), the log checked after each."""
    for _ in range(rounds):
        rids = [submit(stack.base_url, sid, prompt="fill", max_tokens=tokens) for _ in range(per_round)]
        wait_done(r, rids)
        assert r.llen(keys.session_log(sid)) <= CAP  # flat: never more than the cap once the session idles


def test_a_busy_session_keeps_exactly_the_newest_events(capped: Stack, r: redis.Redis) -> None:
    sid = "bound-busy"
    fill(capped, r, sid, rounds=6)  # 6 * 3 * 23 = 414 events
    seq, base = meta(r, sid)
    assert seq == 6 * 3 * 23 and base == seq - CAP + 1
    assert log_ids(r, sid) == list(range(base, seq + 1))
    # a full read of the session (no cursor) starts at the oldest kept event
    events = list(sse(capped.base_url, f"/v1/sessions/{sid}/events", stop_after=CAP, timeout=10))
    assert [e.id for e in events] == list(range(base, seq + 1))


def test_a_new_sessions_cap_holds_from_its_first_request(capped: Stack, r: redis.Redis) -> None:
    """The cap is stored with the meta the first submit creates: a first request longer than the cap is
    trimmed to it once it ends, with no other submit to store the cap meanwhile."""
    sid = "bound-first"
    rid = submit(capped.base_url, sid, prompt="long", max_tokens=CAP + 20)
    wait_done(r, [rid])
    seq, base = meta(r, sid)
    assert seq == CAP + 23 and r.hget(keys.session_meta(sid), "lm") == str(CAP)
    assert log_ids(r, sid) == list(range(base, seq + 1)) and len(log_ids(r, sid)) == CAP


def expired(code: int, reply: Any, oldest: int) -> bool:
    return code == 409 and reply["error"]["type"] == "cursor_expired" and f"oldest kept event is {oldest}" in \
        reply["error"]["message"]


def get_sse_status(base_url: str, path: str, last_id: int | None = None) -> tuple[int, Any]:
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    return call("GET", base_url + path, headers=headers)


def test_resume_from_a_trimmed_cursor_is_409_naming_the_oldest_kept_id(capped: Stack, r: redis.Redis) -> None:
    sid = "bound-resume"
    first = submit(capped.base_url, sid, prompt="old", max_tokens=20)
    wait_done(r, [first])
    fill(capped, r, sid, rounds=3)  # `first` is trimmed away
    seq, base = meta(r, sid)
    assert base > 30
    url = capped.base_url
    for cursor in (1, base - 2):
        assert expired(*get_sse_status(url, f"/v1/sessions/{sid}/events", cursor), base)
        assert expired(*call("GET", f"{url}/v1/sessions/{sid}/events?after={cursor}"), base)
        assert expired(*get_sse_status(url, f"/v1/requests/{first}/events", cursor), base)
        assert expired(*call("GET", f"{url}/v1/requests/{first}/events?after={cursor}"), base)
    # the request form without a cursor: an ended request all of whose events were trimmed. Nothing of it is
    # left to resume (a cursor would answer 204, a clean end with no terminal event), so the 409 points at its
    # final state (it advised "resume from <oldest kept - 1>"; test_a_partly_trimmed_... keeps that advice)
    code, reply = call("GET", f"{url}/v1/requests/{first}/events")
    assert code == 409 and reply["error"]["type"] == "cursor_expired", reply
    assert f"its final state is at GET /v1/requests/{first}" in reply["error"]["message"]
    assert "resume from" not in reply["error"]["message"]

    # a kept cursor, the oldest allowed one included: every later event, once, in order
    for cursor in (base - 1, base + 10):
        by_header = list(sse(url, f"/v1/sessions/{sid}/events", last_id=cursor, stop_after=seq - cursor, timeout=10))
        by_query = list(sse(url, f"/v1/sessions/{sid}/events?after={cursor}", stop_after=seq - cursor, timeout=10))
        assert [e.id for e in by_header] == [e.id for e in by_query] == list(range(cursor + 1, seq + 1))
    # a kept request: its whole stream, from the log alone
    last = log_ids(r, sid)[-1]
    rid = r.lrange(keys.session_log(sid), -1, -1)[0].split("|")[2]
    events = list(sse(url, f"/v1/requests/{rid}/events", timeout=10))
    assert events[-1].id == last and events[-1].event == "done" and token_indices(events) == list(range(20))


def test_a_partly_trimmed_requests_stream_says_where_what_is_left_starts(capped: Stack, r: redis.Redis) -> None:
    """An ended request whose first events were trimmed: its stream without a cursor is a 409 advising the
    cursor from which what is left of it is read, and that cursor serves it to its end."""
    sid = "bound-partly"
    rid = submit(capped.base_url, sid, prompt="long", max_tokens=CAP + 20)
    wait_done(r, [rid])
    seq, base = meta(r, sid)
    assert base > 1
    code, reply = call("GET", f"{capped.base_url}/v1/requests/{rid}/events")
    assert expired(code, reply, base) and f"resume from {base - 1}" in reply["error"]["message"]
    assert "without a cursor" not in reply["error"]["message"]
    events = list(sse(capped.base_url, f"/v1/requests/{rid}/events", last_id=base - 1, timeout=10))
    assert [e.id for e in events] == list(range(base, seq + 1)) and events[-1].event == "done"


def test_a_preempted_request_resumes_from_its_own_tokens_after_trimming(capped: Stack, r: redis.Redis) -> None:
    """The running request's events are never trimmed, even past the cap: its resume rebuilds its output
    from them. Once it ends the log is trimmed back to the cap."""
    sid, tokens = "bound-preempt", 400
    fill(capped, r, sid, rounds=2)
    [worker] = capped.workers.values()
    resumes: list[tuple[int, str]] = []
    real = worker.store.output_so_far

    async def spy(spec: Any) -> tuple[str, bool]:
        so_far = await real(spec)
        resumes.append((spec.start_index, so_far[0]))
        return so_far

    worker.store.output_so_far = spy  # type: ignore[method-assign]
    low = submit(capped.base_url, sid, prompt="long", max_tokens=tokens, priority=0)
    stream = sse(capped.base_url, f"/v1/requests/{low}/events", timeout=30)
    seen: list[SseEvent] = [next(stream)]
    wait_for(lambda: int(r.hget(keys.request(low), "n") or 0) >= 150, what="150 tokens")
    assert r.llen(keys.session_log(sid)) > CAP  # past the cap: the running request's tokens are kept
    high = submit(capped.base_url, "bound-other", prompt="urgent", max_tokens=5, priority=9)
    seen.extend(stream)
    wait_done(r, [low, high])
    assert "preempted" in [e.event for e in seen] and "resumed" in [e.event for e in seen]
    assert token_indices(seen) == list(range(tokens)) and token_text(seen) == sim_text("long", tokens)
    assert resumes and all(so_far == sim_text("long", start) for start, so_far in resumes if start)
    seq, base = meta(r, sid)
    assert log_ids(r, sid) == list(range(seq - CAP + 1, seq + 1)) and base == seq - CAP + 1


def submit_and_cancel(stack: Stack, sid: str, count: int) -> None:
    """`count` requests that end at once (`queued`, `cancelled`: two events each), so the log can move on."""
    for n in range(count):
        rid = submit(stack.base_url, sid, prompt=f"c{n}", max_tokens=1)
        assert call("DELETE", f"{stack.base_url}/v1/requests/{rid}")[0] == 200


def test_a_submit_with_another_cap_sets_it_for_every_later_call(redis_url: str, r: redis.Redis) -> None:
    """The cap is read with a call's first event ids and kept for that call only: a process started with
    a larger cap lets the session's log grow to it, one with a smaller cap trims it back, and one with
    the default removes the stored cap."""
    sid = "bound-recapped"
    default = Settings().session_log_max_events  # never stored: its round leaves 2 * CAP (nothing trimmed)
    for cap, expected in ((CAP, CAP), (3 * CAP, 2 * CAP), (CAP, CAP), (default, 2 * CAP)):
        stack = Stack(fast_settings(redis_url, session_log_max_events=cap)).start(workers=0)
        try:
            submit_and_cancel(stack, sid, CAP // 2)  # CAP events per round
        finally:
            stack.stop()
        assert r.hget(keys.session_meta(sid), "lm") == (None if cap == default else str(cap))
        assert r.llen(keys.session_log(sid)) == expected
    seq, base = meta(r, sid)
    assert log_ids(r, sid) == list(range(base, seq + 1)) and seq == 4 * CAP


def test_the_cap_has_a_floor() -> None:
    from pydantic import ValidationError

    assert Settings().session_log_max_events == 10000 and Settings(session_log_max_events=100)
    with pytest.raises(ValidationError):
        Settings(session_log_max_events=99)
