"""A stop string split by the seam of a continued run (workers/engines/openai.py): the backend searches only what
it generates, so the engine finds a match whose head was streamed before the resume."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from sluicegate.workers.engines.base import Piece, Token


def stop_strings(params: Mapping[str, Any]) -> list[str]:
    """The request's `stop` (OpenAI: a string or a list of strings), as a list of its non-empty strings."""
    stop = params.get("stop")
    given = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return [s for s in given if isinstance(s, str) and s]


def cut_text(piece: Piece, length: int) -> Piece:
    """`piece` with only its text's first `length` characters."""
    if isinstance(piece, Token):
        return replace(piece, text=piece.text[:length])
    return piece[:length] if isinstance(piece, str) else piece


class StopSeam:
    """A stop string across the seam of a continued run: its head in the output so far, its tail in what the
    continuation streams. The backend looks for stop strings only in what it generates (the output so far is
    its prompt), so it misses one split there and runs past where the uninterrupted request would have
    stopped. Its pieces are held while the text after the seam may still complete such a match (a few
    characters at most: a stop string's length); on a match the run stops there, nothing past the match
    streamed (with vLLM's `include_stop_str_in_output`, up to its end); once none can, they go on. Matches
    wholly after the seam are the backend's own."""

    def __init__(self, so_far: str, stops: list[str], include_stop: bool) -> None:
        self.stops = stops
        longest = max(map(len, stops), default=0)
        self.tail = so_far[max(0, len(so_far) - (longest - 1)):] if longest > 1 else ""  # where a match may start
        self.include_stop = include_stop
        self.open = bool(self.tail)  # a match across the seam is still possible
        self.held: list[Piece] = []
        self.after = ""  # the text after the seam, while open

    def feed(self, piece: Piece) -> tuple[list[Piece], bool]:
        """The pieces to stream now (`piece` among them, or held), and whether the output stops here."""
        if not self.open:
            return [piece], False
        self.held.append(piece)
        self.after += piece.text if isinstance(piece, Token) else str(piece)
        text, seam = self.tail + self.after, len(self.tail)
        pending = False
        for start in range(seam):
            for stop in self.stops:
                end = start + len(stop)
                if end <= seam:  # wholly before the seam: not this continuation's
                    continue
                if text.startswith(stop, start):
                    return self._cut((end if self.include_stop else start) - seam), True
                pending = pending or (end > len(text) and stop.startswith(text[start:]))
        if pending and not (isinstance(piece, Token) and piece.delta):  # a tool call's start ends the text
            return [], False
        return self.flush(), False

    def flush(self) -> list[Piece]:
        """The held pieces, and no more holding: no match across the seam can come any more."""
        self.open = False
        held, self.held, self.after = self.held, [], ""
        return held

    def _cut(self, length: int) -> list[Piece]:
        """The held pieces up to `length` characters after the seam (the match's start, or its end)."""
        out: list[Piece] = []
        for piece in self.flush():
            text = piece.text if isinstance(piece, Token) else str(piece)
            if length <= 0:
                break
            out.append(piece if len(text) <= length else cut_text(piece, length))
            length -= len(text)
        return out
