"""webhooks/rooms.py: which due callbacks start, wait held, are left due or pushed back (no I/O to check)."""

from __future__ import annotations

from sluicegate.webhooks.rooms import Placement, Rooms


def rooms(**overrides: float) -> Rooms:
    given = {"per_host": 2, "concurrency": 5, "held_per_host": 2, "slow_after": 1.0}
    return Rooms(**{**given, **overrides})  # type: ignore[arg-type]


def test_a_full_host_that_turns_over_holds_then_leaves_due_and_hands_on() -> None:
    room = rooms()
    placed = [room.place(f"r{i}", "a", now=0.0) for i in range(6)]
    assert placed == [Placement.START] * 2 + [Placement.HOLD] * 2 + [Placement.LEAVE] * 2
    assert all(room.known(f"r{i}") for i in range(4)) and not room.known("r4")
    assert room.place("b1", "b", now=0.0) is Placement.START  # another host has its own places
    assert room.end("r0") == "a"
    assert room.next_held("a", now=0.1) == "r2"  # the freed place goes to the oldest held one
    assert room.next_held("a", now=0.1) is None  # no place free: r3 waits
    assert not room.wants_pass("a")  # r3 is still held for it
    room.end("r1")
    assert room.next_held("a", now=0.2) == "r3"
    assert room.wants_pass("a")  # the hold is used up and a pass left callbacks of it due
    room.pass_began()
    assert not room.wants_pass("a")  # that pass reads them again


def test_a_slow_host_pushes_back_what_waits_for_it() -> None:
    room = rooms()
    for rid in ("r0", "r1", "r2", "r3"):
        room.place(rid, "a", now=0.0)
    assert room.release_slow(now=0.5) == {}  # its attempts are young: it still turns over
    assert room.release_slow(now=1.0) == {"a": ["r2", "r3"]}  # an attempt has run 1 s: the held ones go back
    assert not room.known("r2") and room.held_rids() == []
    assert room.place("r2", "a", now=1.0) is Placement.PUSH
    room.end("r0")
    assert room.next_held("a", now=1.1) is None and not room.wants_pass("a")


def test_concurrency_bounds_every_host_and_a_freed_place_wants_a_pass() -> None:
    room = rooms(per_host=9, concurrency=3)
    assert [room.place(f"r{i}", f"h{i}", now=0.0) for i in range(4)] == [Placement.START] * 3 + [Placement.FULL]
    assert room.in_flight == 3
    room.end("r0")
    assert room.wants_pass("h0") and room.in_flight == 2 and "h0" not in room.hosts
    room.pass_began()
    assert room.place("r3", "h3", now=0.0) is Placement.START


def test_a_callback_without_a_host_is_not_bound() -> None:
    room = rooms(per_host=1)
    assert [room.place(f"r{i}", "", now=0.0) for i in range(3)] == [Placement.START] * 3
    for i in range(3):
        room.end(f"r{i}")
    assert room.hosts == {} and room.in_flight == 0
