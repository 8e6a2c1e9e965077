"""Which due callbacks a delivery process may start now, and what it does with the others (no I/O here).

Two bounds: `per_host` attempts at once per receiver host, `concurrency` in all. A due callback whose
host is full is not simply left for the next pass: that would hold a fast receiver to `per_host`
callbacks a poll, however quickly it answers. So what happens to it depends on the host:
- the host is turning over (none of its attempts has run `slow_after` seconds yet): the callback is held
  here, unclaimed, up to `held_per_host` of them, and started the moment one of the host's places frees
  (`next_held`); past that many it is pushed back a moment (LEAVE: behind the callbacks already due, so
  that a fast host's backlog in one bucket never hides another host's), and a pass comes early once the
  host's held ones are all started (`wants_pass`);
- the host is slow (an attempt of it has run `slow_after` seconds or more: a receiver that answers late
  or never): the callback is pushed back a while in the store, and so are the ones held for it
  (`release_slow`), so that a dead receiver's growing backlog neither sits at the front of its bucket
  (a pass reads only the oldest due callbacks of each) nor is read again every pass.
A held callback stays due in the store, unclaimed: another process may claim it first, and then this
one's claim is refused and the place passes on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class Placement(Enum):
    START = "start"  # a place is free: start its delivery now
    HOLD = "hold"  # its host is full but turning over: held here, started when a place frees
    PUSH = "push"  # its host is slow: push its due time back in the store
    LEAVE = "leave"  # held enough for its host already: push it back a moment, for an early pass
    FULL = "full"  # `concurrency` attempts in flight: nothing more starts in this pass


@dataclass
class Host:
    in_flight: dict[str, float] = field(default_factory=dict)  # request id -> when its attempt began
    held: deque[str] = field(default_factory=deque)  # due, unclaimed, waiting for one of its places
    left_due: bool = False  # a pass pushed callbacks of it past its full hold (LEAVE): they want a pass


class Rooms:
    def __init__(self, *, per_host: int, concurrency: int, held_per_host: int, slow_after: float) -> None:
        self.per_host = per_host
        self.concurrency = concurrency
        self.held_per_host = held_per_host
        self.slow_after = slow_after
        self.hosts: dict[str, Host] = {}
        self.host_of: dict[str, str] = {}  # request id -> its host, for every callback in flight or held
        self.in_flight = 0
        self.hit_concurrency = False  # a pass stopped at `concurrency`: a freed place wants a pass

    def known(self, rid: str) -> bool:
        """In flight or held here: a pass skips it."""
        return rid in self.host_of

    def full(self) -> bool:
        """`concurrency` attempts in flight (a freed place then wants a pass)."""
        full = self.in_flight >= self.concurrency
        if full:
            self.hit_concurrency = True
        return full

    def place(self, rid: str, host: str, now: float) -> Placement:
        """What a pass does with a due callback it read (`host` "" for one without a valid URL: no bound,
        its claim drops it). START and HOLD are recorded here; the caller starts a START."""
        if self.full():
            return Placement.FULL
        room = self.hosts.setdefault(host, Host())
        if not host or len(room.in_flight) < self.per_host:
            self.begin(rid, host, now)
            return Placement.START
        if self.slow(room, now):
            return Placement.PUSH
        if len(room.held) >= self.held_per_host:
            room.left_due = True
            return Placement.LEAVE
        room.held.append(rid)
        self.host_of[rid] = host
        return Placement.HOLD

    def begin(self, rid: str, host: str, now: float) -> None:
        self.hosts.setdefault(host, Host()).in_flight[rid] = now
        self.host_of[rid] = host
        self.in_flight += 1

    def end(self, rid: str) -> str:
        """An attempt ended: its place is free; returns its host."""
        host = self.host_of.pop(rid)
        room = self.hosts[host]
        del room.in_flight[rid]
        self.in_flight -= 1
        if not room.in_flight and not room.held:
            del self.hosts[host]
        return host

    def next_held(self, host: str, now: float) -> str | None:
        """The held callback to start in a place of `host` that just freed (recorded as begun), if any."""
        room = self.hosts.get(host)
        if room is None or not room.held or len(room.in_flight) >= self.per_host or self.in_flight >= self.concurrency:
            return None
        rid = room.held.popleft()
        self.in_flight += 1
        room.in_flight[rid] = now
        return rid

    def wants_pass(self, host: str) -> bool:
        """After a place of `host` freed: true when a pass should come early, because callbacks were left
        due that now have room (the host's hold is used up, or a pass stopped at `concurrency`)."""
        room = self.hosts.get(host)
        host_waits = room is not None and room.left_due and not room.held
        return host_waits or self.hit_concurrency

    def pass_began(self) -> None:
        """A pass reads the store again: what earlier passes left due is seen anew."""
        self.hit_concurrency = False
        for room in self.hosts.values():
            room.left_due = False

    def release_slow(self, now: float) -> list[str]:
        """The held callbacks of hosts that turned slow, let go here: the caller pushes them back."""
        released: list[str] = []
        for room in self.hosts.values():
            if room.held and self.slow(room, now):
                released += room.held
                room.held.clear()
        for rid in released:
            del self.host_of[rid]
        for host in [h for h, room in self.hosts.items() if not room.in_flight and not room.held]:
            del self.hosts[host]
        return released

    def slow(self, room: Host, now: float) -> bool:
        return any(now - began >= self.slow_after for began in room.in_flight.values())

    def held_rids(self) -> list[str]:
        """Every callback held here: due and unclaimed, so at the front of their buckets."""
        return [rid for room in self.hosts.values() for rid in room.held]
