"""Events of a session log: parse the stored "id|event|rid|json" form and encode it as SSE."""

from __future__ import annotations

from dataclasses import dataclass

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
        return cls(int(seq), name, rid, data)

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL_EVENTS

    def sse(self) -> bytes:
        return f"id: {self.seq}\nevent: {self.name}\ndata: {self.data}\n\n".encode()


def parse_published(message: bytes | str) -> list[Event]:
    """A pubsub message carries the entries of one append, newline-separated."""
    text = message.decode() if isinstance(message, bytes) else message
    return [Event.parse(line) for line in text.split("\n")]
