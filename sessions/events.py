"""Events of a session log: parse the stored "id|event|rid|json" form and encode it as SSE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

TERMINAL_EVENTS = frozenset({"done", "error", "cancelled"})
EVENT_NAMES = frozenset({"queued", "started", "token", "preempted", "resumed"}) | TERMINAL_EVENTS


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    name: str
    request_id: str
    data: str  # JSON text, stored once and sent as is

    @classmethod
    def parse(cls, entry: bytes | str) -> Event:
        text = entry.decode() if isinstance(entry, bytes) else entry
        seq, name, rid, data = text.split("|", 3)
        if name == "queued" and '"request_id"' not in data:
            data = with_request_id(data, rid)
        return cls(int(seq), name, rid, data)

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL_EVENTS

    def sse(self) -> bytes:
        return f"id: {self.seq}\nevent: {self.name}\ndata: {self.data}\n\n".encode()


def with_request_id(data: str, rid: str) -> str:
    """A `queued` event's data with its request_id put back: the log stores it without (the entry's
    rid field names it, and a queued request's memory is what a million sessions pay for)."""
    rest = data[1:-1]
    return f'{{"request_id":"{rid}"{"," if rest else ""}{rest}}}'


def parse_published(message: bytes | str) -> list[Event]:
    """A pubsub message carries the entries of one append, newline-separated."""
    text = message.decode() if isinstance(message, bytes) else message
    return [Event.parse(line) for line in text.split("\n")]


class WireEvent(NamedTuple):
    id: str | None
    event: str
    data: str  # the data lines, joined by "\n"


class SseParser:
    """Decodes what `Event.sse()` encodes, one line at a time, for any client (blocking, asyncio or
    gevent): `feed(line)` returns the event that a blank line completes; comments (pings) and
    events without data are skipped, as the SSE spec says."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._id: str | None = None
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: bytes | str) -> WireEvent | None:
        text = (line.decode() if isinstance(line, bytes) else line).rstrip("\r\n")
        if not text:
            done = WireEvent(self._id, self._event, "\n".join(self._data)) if self._data else None
            self._reset()
            return done
        if not text.startswith(":"):
            name, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self._data.append(value)
            elif name == "id":
                self._id = value
            elif name == "event":
                self._event = value
        return None
