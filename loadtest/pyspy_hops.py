"""Where a process's CPU goes, by hop: py-spy's raw samples, each counted once under its innermost frame
that names a hop. `python -m sluicegate.loadtest.pyspy_hops api.txt worker.txt` after
`py-spy record --format raw -o api.txt --pid PID` (README, Performance, "Where issue 15 stands")."""

from __future__ import annotations

import collections
import re
import sys

HOPS: list[tuple[str, str]] = [  # (hop, a frame's file or function), innermost match wins
    ("Redis client (lean + redis-py)", r"sessions/resp\.py|redis/asyncio|redis/_parsers|hiredis"),
    ("pub/sub subscriber and hub fan-out", r"sessions/subscriber\.py|sessions/hub\.py|parse_published"),
    ("engine", r"workers/engines/"),
    ("log read, events to SSE", r"sessions/stream\.py|sessions/events\.py|api/streaming\.py|SessionStore\.read"),
    ("submit: body, checks, call", r"api/requests_routes\.py|api/schemas\.py|pydantic|sessions/requests\.py|"
                                   r"api/guardrails|sessions/transitions|sessions/scripts|SessionStore\.submit|"
                                   r"api/directory|api/openai_routes|api/chat_render"),
    ("hot path, middleware, responses", r"api/hot_path\.py|api/limits\.py|api/deadline\.py|starlette/|fastapi/|"
                                        r"api/responses\.py"),
    ("uvicorn HTTP (parse, write)", r"uvicorn/protocols"),
    ("worker: runs, inbox, appends", r"workers/"),
]


def hops(path: str) -> tuple[int, collections.Counter[str]]:
    total, out = 0, collections.Counter[str]()
    with open(path) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            hop = "event loop (I/O, wake-ups), other"
            for frame in reversed(stack.split(";")):
                hit = next((name for name, pattern in HOPS if re.search(pattern, frame)), None)
                if hit:
                    hop = hit
                    break
            out[hop] += n
    return total, out


def main(paths: list[str]) -> None:
    for path in paths:
        total, out = hops(path)
        print(f"{path}: {total} samples")
        for hop, n in out.most_common():
            print(f"  {100 * n / max(1, total):5.1f}%  {hop}")


if __name__ == "__main__":
    main(sys.argv[1:])
