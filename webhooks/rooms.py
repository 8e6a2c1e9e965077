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
How far a callback is pushed back (PUSH or LEAVE) is its turn (`turn`): by its place in its host's queue,
not a flat delay, so that each waiting callback is read about once per turn it can get, not every pass.
The host's places free `per_host` at a time about once a `wait` (for a slow host its attempts' recent
length; for one that turns over, half of that: read early rather than late, so that no place idles), so
the queue is cut into rounds of `per_host`: the first due `wait / per_host` on (for a slow host, at least
a share of the timeout), each next one a `wait` later, behind those pushed back before (the host's tail,
kept across passes), but never further than `cap` (about a timeout): a host that recovers has its
backlog read again within that, not at turns guessed while it was slow. A slow host's tail is dropped once
it is no longer slow, so its next waits start at the front again. One read again before its turn (the
guess was short) goes to the end again.
A LEAVE'd callback's due time is noted: a pass comes early once one of them is due and the hold is used up.
A held callback stays due in the store, unclaimed: another process may claim it first, and then this
one's claim is refused and the place passes on. Its receiver (an origin: the places are per host, but a
host may hold several receivers) is noted with it, so that the caller can let go of those of a receiver
it gives up on (`drop_held`), leaving their places in the hold to the host's other receivers.
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
    held_origins: dict[str, str] = field(default_factory=dict)  # held request id -> its receiver (origin)
    left_due: bool = False  # a pass pushed callbacks of it past its full hold (LEAVE): they want a pass
    leave_dues: deque[int] = field(default_factory=deque)  # when those LEAVE'd callbacks are due (ms, in order)


@dataclass
class Tail:
    """The end of a host's queue of pushed-back callbacks: the round being filled and its room left."""

    due_ms: int
    left: int
    slow: bool = False  # made by a slow host's pushes: dropped once the host is no longer slow


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
        self.tails: dict[str, Tail] = {}  # host -> the end of its pushed-back queue, while in the future
        self.answers: dict[str, float] = {}  # host -> its attempts' recent length (seconds, smoothed)

    def known(self, rid: str) -> bool:
        """In flight or held here: a pass skips it."""
        return rid in self.host_of

    def full(self) -> bool:
        """`concurrency` attempts in flight (a freed place then wants a pass)."""
        full = self.in_flight >= self.concurrency
        if full:
            self.hit_concurrency = True
        return full

    def host_full(self, host: str) -> bool:
        """`per_host` attempts of `host` in flight here: a due callback of it would wait (HOLD, LEAVE, PUSH)."""
        room = self.hosts.get(host)
        return bool(host) and room is not None and len(room.in_flight) >= self.per_host

    def place(self, rid: str, host: str, now: float, origin: str = "") -> Placement:
        """What a pass does with a due callback it read (`host` "" for one without a valid URL: no bound,
        its claim drops it). START and HOLD are recorded here; the caller starts a START. A full host's
        callback waits its host's way (HOLD, LEAVE, PUSH) whether or not `concurrency` is reached: only one
        with a place of its host free is FULL (left due) then, so that a full process pushes a slow host's
        backlog back as any pass does instead of reading it again every pass."""
        room = self.hosts.get(host)
        if room is not None and self.host_full(host):
            if self.slow(room, now):
                return Placement.PUSH
            if len(room.held) >= self.held_per_host:
                room.left_due = True
                return Placement.LEAVE
            room.held.append(rid)
            room.held_origins[rid] = origin
            self.host_of[rid] = host
            return Placement.HOLD
        if self.full():
            return Placement.FULL
        self.begin(rid, host, now)
        return Placement.START

    def begin(self, rid: str, host: str, now: float) -> None:
        self.hosts.setdefault(host, Host()).in_flight[rid] = now
        self.host_of[rid] = host
        self.in_flight += 1

    def end(self, rid: str, now: float | None = None) -> str:
        """An attempt ended (at `now`: its length counts in its host's recent answer time): its place is
        free; returns its host."""
        host = self.host_of.pop(rid)
        room = self.hosts[host]
        began = room.in_flight.pop(rid)
        if now is not None and host:
            took = max(now - began, 0.0)
            last = self.answers.get(host)
            self.answers[host] = took if last is None else (last + took) / 2  # recent ones weigh most
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
        room.held_origins.pop(rid, None)
        self.in_flight += 1
        room.in_flight[rid] = now
        return rid

    def wants_pass(self, host: str, now_ms: int | None = None) -> bool:
        """After a place of `host` freed: true when a pass should come early, because callbacks were left
        due that now have room (the host's hold is used up, and a pass LEAVE'd callbacks of it since the
        last pass or one it LEAVE'd is due by `now_ms`; or a pass stopped at `concurrency`)."""
        room = self.hosts.get(host)
        host_waits = room is not None and not room.held and (
            room.left_due or (now_ms is not None and bool(room.leave_dues) and room.leave_dues[0] <= now_ms))
        return host_waits or self.hit_concurrency

    def pass_began(self, now_ms: int | None = None, now: float | None = None) -> None:
        """A pass reads the store again: what earlier passes left due is seen anew (what was due by `now_ms`
        is read by it, the rest wants a pass when due); tails that ended are dropped, and so is a slow host's
        once it is no longer slow at `now` (monotonic): its next waits are not put behind turns guessed
        while it was slow."""
        self.hit_concurrency = False
        for room in self.hosts.values():
            room.left_due = False
            while now_ms is not None and room.leave_dues and room.leave_dues[0] <= now_ms:
                room.leave_dues.popleft()
        if now_ms is not None:
            for host in [h for h, tail in self.tails.items() if tail.due_ms <= now_ms
                         or (tail.slow and now is not None and not self.host_slow(h, now))]:
                del self.tails[host]
            for host in [h for h in self.answers if h not in self.hosts and h not in self.tails]:
                del self.answers[host]

    def answer_time(self, host: str) -> float | None:
        """How long the host's recent attempts took (seconds), None before one of them ended."""
        return self.answers.get(host)

    def turn(self, host: str, now_ms: int, wait: float, *, first: float = 0.0, leave: bool = False,
             cap: float = 0.0, slow: bool = False) -> int:
        """When a callback of `host` that waits (PUSH with `slow`, or LEAVE with `leave`) is due again (ms): its
        turn, at the end of the host's queue, in rounds of `per_host` a `wait` apart, the first `wait /
        per_host` from now (its places, all taken, free about that often) or `first` seconds when that is
        longer, so that it is read about once per turn; but no more than `cap` seconds from now (> 0), so that
        a host that recovers has its backlog read again within that. One read again before its turn goes to
        the end again."""
        wait_ms = max(int(wait * 1000), 1)
        first = now_ms + max(wait_ms // self.per_host, int(first * 1000), 1)
        last = now_ms + max(int(cap * 1000), 1) if cap > 0 else None
        if last is not None:
            first = min(first, last)
        tail = self.tails.get(host)
        if tail is None or tail.due_ms < first:
            tail = self.tails[host] = Tail(first, self.per_host)
        elif not tail.left:
            tail.due_ms, tail.left = tail.due_ms + wait_ms, self.per_host
        if last is not None and tail.due_ms > last:  # the rest of the queue waits no longer than the cap
            tail.due_ms = last
        tail.left -= 1
        tail.slow = tail.slow or slow
        if leave and (room := self.hosts.get(host)) is not None:
            room.leave_dues.append(tail.due_ms)
        return tail.due_ms

    def oldest_attempt(self, host: str, now: float) -> float:
        """How long the host's oldest attempt in flight has run (seconds; 0 with none)."""
        room = self.hosts.get(host)
        return max((now - began for began in room.in_flight.values()), default=0.0) if room else 0.0

    def release_slow(self, now: float) -> dict[str, list[str]]:
        """The held callbacks of hosts that turned slow, let go here, by host: the caller pushes them back."""
        released: dict[str, list[str]] = {}
        for host, room in self.hosts.items():
            if room.held and self.slow(room, now):
                released[host] = list(room.held)
                room.held.clear()
                room.held_origins.clear()
        for rids in released.values():
            for rid in rids:
                del self.host_of[rid]
        self.drop_idle()
        return released

    def drop_held(self, origins: set[str]) -> dict[str, list[str]]:
        """The held callbacks of these receivers (origins), let go here, by origin: the caller gives up on
        them, and the host's hold is left to its other receivers' callbacks."""
        dropped: dict[str, list[str]] = {}
        if not origins:
            return dropped
        for room in self.hosts.values():
            kept: deque[str] = deque()
            for rid in room.held:
                origin = room.held_origins.get(rid, "")
                if origin in origins:
                    dropped.setdefault(origin, []).append(rid)
                    del room.held_origins[rid]
                    del self.host_of[rid]
                else:
                    kept.append(rid)
            room.held = kept
        self.drop_idle()
        return dropped

    def drop_idle(self) -> None:
        """Forget the hosts with nothing in flight or held here."""
        for host in [h for h, room in self.hosts.items() if not room.in_flight and not room.held]:
            del self.hosts[host]

    def host_slow(self, host: str, now: float) -> bool:
        """`host` has an attempt here that has run `slow_after` seconds or more."""
        room = self.hosts.get(host)
        return room is not None and self.slow(room, now)

    def slow(self, room: Host, now: float) -> bool:
        return any(now - began >= self.slow_after for began in room.in_flight.values())

    def held_rids(self) -> list[str]:
        """Every callback held here: due and unclaimed, so at the front of their buckets."""
        return [rid for room in self.hosts.values() for rid in room.held]
