"""Two review fixes of the data plane:

- a session log trimmed to exactly the first id after a store restart's jump keeps that jump's hole
  (sessions/lua/includes/log_ids.lua `holes_after`), and a resume from the last id before the jump is
  accepted (sessions/store.py `LogBounds.trimmed`): nothing was ever kept between them, so nothing was
  missed. Until then the client cut off by the restart got a false 409 `cursor_expired` for the whole
  run of the request that started after it;
- the sim-backend sends `usage` in a stream only when `stream_options.include_usage` asks for it, as
  vLLM and OpenAI do (workers/sim_backend.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.store import LogBounds, log_gap
from sluicegate.workers.sim_backend import create_sim_backend
from tests.helpers import Stack, call, fast_settings, submit
from tests.openai_helpers import ServerThread, chat_stream
from tests.test_log_epoch import resume as resume_from

JUMP = 1_000_000  # LOG_ID_JUMP in sessions/lua/includes/log_ids.lua
CAP = 100  # --session-log-max-events: the smallest allowed


@pytest.fixture
def capped(redis_url: str) -> Iterator[Stack]:
    """The API alone with the smallest log cap: submits write `queued` events and nothing runs, so a
    session's ids are exact, and a request left queued stays its session's head (the trim stops at it)."""
    running = Stack(fast_settings(redis_url, session_log_max_events=CAP)).start(workers=0)
    yield running
    running.stop()


def resume(base_url: str, path: str, last_id: int) -> tuple[int, Any]:
    """The status and error of a resume that is refused, or the id of the first event it streams."""
    return resume_from(base_url, path, last_id, 1)


def trimmed(code: int, reply: Any, oldest: int) -> bool:
    error = reply["error"] if isinstance(reply, dict) else {}
    return code == 409 and error.get("type") == "cursor_expired" and \
        f"the oldest kept event is {oldest}" in error.get("message", "")


def lost(code: int, reply: Any, kept_before: int) -> bool:
    error = reply["error"] if isinstance(reply, dict) else {}
    return code == 409 and error.get("type") == "cursor_expired" and \
        f"the last event kept before it is {kept_before}" in error.get("message", "")


def rounds(base_url: str, sid: str, count: int, tag: str) -> None:
    """Requests submitted and cancelled at once (a queued request is never trimmed: these let the log move on)."""
    for n in range(count):
        rid = submit(base_url, sid, prompt=f"{tag}{n}", max_tokens=1)
        assert call("DELETE", f"{base_url}/v1/requests/{rid}")[0] == 200


def log_ids(r: redis.Redis, sid: str) -> list[int]:
    return [int(e.split("|", 1)[0]) for e in r.lrange(keys.session_log(sid), 0, -1)]


def test_a_resume_from_the_last_id_before_a_jump_survives_a_trim_to_the_jumps_end(capped: Stack,
                                                                                  r: redis.Redis) -> None:
    base, sid = capped.base_url, "review-hole"
    path, meta = f"/v1/sessions/{sid}/events", keys.session_meta(sid)
    rounds(base, sid, 30, "a")
    before = int(r.hget(meta, "seq"))  # the last id before the restart: a client cut off by it holds this one
    r.function_flush()  # the next call loads the library again: a new boot, the ids jump
    after = before + JUMP + 1
    head = submit(base, sid, prompt="head", max_tokens=1)  # stays queued: the trim never passes its `queued`
    rounds(base, sid, 60, "b")
    assert int(r.hget(meta, "base")) == after and log_ids(r, sid)[0] == after
    assert resume(base, path, before) == (200, [after])  # nothing kept between: nothing missed
    assert r.hget(meta, "hl") == f"{before}:{after}"  # kept: it ends at the oldest kept id
    assert resume(base, path, after - 1) == (200, [after])
    code, reply = resume(base, path, before - 1)  # event `before` itself was trimmed
    assert trimmed(code, reply, after), (code, reply)
    code, reply = resume(base, path, before + 1)  # inside the hole: an id that may have been handed out and lost
    assert lost(code, reply, before), (code, reply)

    # once the first id after the jump is trimmed too, the hole goes, and `before` is a trimmed cursor
    assert call("DELETE", f"{base}/v1/requests/{head}")[0] == 200
    rounds(base, sid, 60, "c")
    oldest = int(r.hget(meta, "base"))
    assert oldest > after and r.hget(meta, "hl") is None
    code, reply = resume(base, path, before)
    assert trimmed(code, reply, oldest), (code, reply)


def test_holes_that_run_into_each_other_are_kept_together(capped: Stack, r: redis.Redis) -> None:
    """A jump that no event followed (its call failed between its boot check and its first event), then a
    second restart: the two holes cover every id between the last kept before them and the first after."""
    base, sid = capped.base_url, "review-holes"
    path, meta = f"/v1/sessions/{sid}/events", keys.session_meta(sid)
    rounds(base, sid, 30, "a")
    before = int(r.hget(meta, "seq"))
    # what check_boot writes at a jump (log_ids.lua), with a boot no library has: the next call jumps again
    r.hset(meta, mapping={"seq": before + JUMP, "hl": f"{before}:{before + JUMP + 1}", "bt": "gone"})
    middle, after = before + JUMP, before + 2 * JUMP + 1
    submit(base, sid, prompt="head", max_tokens=1)
    rounds(base, sid, 60, "b")
    assert int(r.hget(meta, "base")) == after
    assert resume(base, path, before) == (200, [after])
    assert r.hget(meta, "hl") == f"{before}:{middle + 1},{middle}:{after}"
    assert resume(base, path, middle) == (200, [after])  # the first hole's end - 1: the same place as `before`
    code, reply = resume(base, path, before - 1)
    assert trimmed(code, reply, after), (code, reply)
    code, reply = resume(base, path, before + 1)
    assert lost(code, reply, before), (code, reply)
    code, reply = resume(base, path, middle + 1)
    assert lost(code, reply, middle), (code, reply)


def test_log_bounds_accept_the_cursor_before_a_hole_ending_at_the_oldest_kept_id() -> None:
    """The check every reader makes (api/streaming.py check_cursor, sessions/stream.py's backlog pages,
    api/output.py), on bounds as read_log returns them."""
    hole = LogBounds(last_id=1_000_200, oldest_kept=1_000_064, holes=((63, 1_000_064),))
    assert not hole.trimmed(63) and log_gap(hole, 63) is None
    assert hole.trimmed(62) and log_gap(hole, 62) is not None
    assert not hole.trimmed(1_000_063) and log_gap(hole, 1_000_063) is None
    gap = log_gap(hole, 64)
    assert gap is not None and gap.lost_before == 63
    # a hole the trim went past, or one with kept ids between it and the oldest kept, changes nothing
    assert LogBounds(last_id=1_000_200, oldest_kept=1_000_070, holes=((63, 1_000_064),)).trimmed(63)
    assert LogBounds(last_id=1_000_200, oldest_kept=1_000_064, holes=((3, 1_000_004),)).trimmed(3)
    # a later hole does not hide an earlier one that ends at the oldest kept id
    later = LogBounds(last_id=2_000_300, oldest_kept=1_000_064, holes=((63, 1_000_064), (1_000_100, 2_000_101)))
    assert not later.trimmed(63) and later.trimmed(62)
    chained = LogBounds(last_id=2_000_200, oldest_kept=2_000_064, holes=((63, 1_000_064), (1_000_063, 2_000_064)))
    assert not chained.trimmed(63) and chained.trimmed(62)


MESSAGES = [{"role": "user", "content": "tell me about sluice gates"}]


def test_the_sim_backend_streams_usage_only_when_asked() -> None:
    with ServerThread(create_sim_backend(2000.0, 0.0)) as backend:
        plain = chat_stream(backend.url, {"messages": MESSAGES, "max_tokens": 3})
        assert plain.status == 200 and plain.done and len(plain.content_chunks) == 3
        assert not any("usage" in c for c in plain.chunks), plain.chunks[-1]
        final = plain.chunks[-1]
        assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
        no = chat_stream(backend.url, {"messages": MESSAGES, "max_tokens": 2,
                                       "stream_options": {"include_usage": False}})
        assert no.done and not any("usage" in c for c in no.chunks)

        asked = chat_stream(backend.url, {"messages": MESSAGES, "max_tokens": 3,
                                          "stream_options": {"include_usage": True}})
        finish, usage = asked.chunks[-2], asked.chunks[-1]
        assert asked.done and "usage" not in finish and finish["choices"][0]["finish_reason"] == "length"
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
        # not streamed: the usage is always in the completion, as OpenAI and vLLM send it
        code, reply = call("POST", f"{backend.url}/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
        assert code == 200 and reply["usage"]["completion_tokens"] == 2
