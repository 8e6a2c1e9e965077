"""What Valkey does for one request: the function library's calls of a request's life, on a scratch server.

N requests, each in a session of its own, go through the one-server transitions in three phases. Each
phase is read from INFO commandstats alone (nothing else calls the server):
- submit: `submit_one` stores the request and, a slot being free, starts it at once (dispatch included);
- append: one `append` a token for each token but the last (a request's tokens when no two share a call);
- finish: `finish_one` carrying the last token (a run's end appends its last tokens), the slot given back.
For each: its calls, the Redis commands a call runs (as the server counts them), and the server's
microseconds a call (the function's whole time, its commands included; the replication and AOF feed that
follow a call are not). Each call's reply is checked, and every request must end done with all its tokens.
The server time moves with the host by 10-30% between runs; the command counts do not. Compare two trees by
running this from each in turn (`--rounds` alternates nothing: it repeats the phases on fresh requests).
Only the library's calls are counted: not the worker's inbox read, nor the API's own commands.

`--idle-ms 0,1,5,20,100` adds what a first token meets on an idle stack: the submit's server time when each
call comes after that long with nothing sent (the client sleeps, blocking), on fresh requests. On a VM a
process that wakes after idling runs its code several times slower than back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from sluicegate.loadtest.common import print_table, progress, scratch_server, write_result
from sluicegate.sessions import keys
from sluicegate.sessions.registry import register_group
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import Tail, Transitions

GROUP, WORKER = "bench", "bench.calls.0"
NOT_THE_CALLS = frozenset({"fcall", "config|resetstat", "info"})  # the calls themselves, and the reading of them
# A client that connected during a phase would add these: the phase's counts would not be the calls' alone.
CONNECTION_SETUP = frozenset({"hello", "auth", "select", "client|setinfo", "client|setname"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--requests", type=int, default=500, help="requests a round, each in its own session")
    parser.add_argument("--tokens", type=int, default=16, help="tokens a request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each on fresh requests")
    parser.add_argument("--idle-ms", default="", metavar="LIST",
                        help="comma-separated idle times (ms): the submit's server time when each call follows that "
                             "much idleness, -n calls each (default: not measured)")


def idle_times(text: str) -> list[float]:
    """`--idle-ms` as milliseconds, in the order given."""
    times = [float(part) for part in text.split(",") if part.strip()]
    if any(t < 0 for t in times):
        raise ValueError("--idle-ms: times must be >= 0")
    return times


async def _phase(client: Redis, name: str, calls: list[Any], expected: Callable[[Any], bool]) -> dict[str, Any]:
    """Run the calls one after the other, each reply checked by `expected`; what the server counted for them."""
    await client.config_resetstat()
    for call in calls:
        reply = await call()
        if not expected(reply):
            raise RuntimeError(f"{name}: a call answered {reply!r}")
    stats = {command.removeprefix("cmdstat_"): s for command, s in (await client.info("commandstats")).items()}
    if CONNECTION_SETUP & set(stats):
        raise RuntimeError(f"{name}: a client connected during the phase ({sorted(CONNECTION_SETUP & set(stats))})")
    fcall = stats.get("fcall", {"calls": 0, "usec": 0})
    inner = sum(s["calls"] for command, s in stats.items() if command not in NOT_THE_CALLS)
    count = max(1, fcall["calls"])
    return {"phase": name, "calls": fcall["calls"], "commands_a_call": inner / count,
            "usec_a_call": fcall["usec"] / count}


async def _free_slots(client: Redis, t: Transitions, n: int) -> None:
    """The worker with `n` free slots again, its inbox emptied of the last phase's assignments (nobody takes them)."""
    await client.delete(keys.worker_inbox(GROUP, WORKER))
    await t.register_worker(GROUP, WORKER, free=n, total=n)


async def _round(client: Redis, t: Transitions, n: int, tokens: int, index: int) -> list[dict[str, Any]]:
    await _free_slots(client, t, n)
    requests = [NewRequest(session_id=f"calls-{index}-{i}", max_tokens=tokens, priority=5, tenant="t", group=GROUP,
                           prompt="tell me about the river that runs under the stone mill") for i in range(n)]

    def token(rid: str, at: int) -> str:
        return json.dumps({"request_id": rid, "index": at, "text": "word "}, separators=(",", ":"))

    submits = [lambda req=req: t.submit(req) for req in requests]
    appends = [lambda req=req, at=at: t.append(req.request_id, "1", at, [token(req.request_id, at)])
               for req in requests for at in range(tokens - 1)]
    finishes = [lambda req=req: t.finish(req.request_id, "1", wid=WORKER, group=GROUP, outcome="done", detail="length",
                                         return_slot=True, tail=Tail(tokens - 1, [token(req.request_id, tokens - 1)]))
                for req in requests]
    rows = [await _phase(client, "submit (submit_one: stored, dispatched, started)", submits,
                         lambda reply: reply[0] == "ok"),
            await _phase(client, "append (one token a call)", appends, lambda reply: int(reply[0]) == 1),
            await _phase(client, "finish (finish_one with the last token)", finishes, lambda reply: reply is True)]
    for req in requests:
        status, produced = await client.hmget(keys.request(req.request_id), "st", "n")
        if (status, produced) != (b"done", str(tokens).encode()):
            raise RuntimeError(f"request {req.request_id} ended as {status!r} with {produced!r} tokens, not done "
                               f"with {tokens}")
    return rows


async def _after_idle(client: Redis, t: Transitions, n: int, idle_ms: float, phase: int) -> dict[str, Any]:
    """`n` submits, each after `idle_ms` of a blocking sleep (nothing reaches the server meanwhile), each in a
    session of its own (`phase`: this one's place in --idle-ms, which may name a time twice)."""
    await _free_slots(client, t, n)
    requests = [NewRequest(session_id=f"calls-idle-{phase}-{i}", max_tokens=1, priority=5, tenant="t",
                           group=GROUP, prompt="the stone mill") for i in range(n)]

    def submit_after_idle(req: NewRequest) -> Callable[[], Any]:
        async def call() -> Any:
            time.sleep(idle_ms / 1000)  # blocking: the client's loop wakes nothing meanwhile
            return await t.submit(req)
        return call

    row = await _phase(client, f"submit after {idle_ms:g} ms idle", [submit_after_idle(req) for req in requests],
                       lambda reply: reply[0] == "ok")
    for req in requests:  # each took the first token's way: started at once, in the submit's own call
        if (status := await client.hget(keys.request(req.request_id), "st")) != b"running":
            raise RuntimeError(f"request {req.request_id} is {status!r} after its submit, not running")
    return {"idle_ms": idle_ms, **row}


async def _measure(url: str, n: int, tokens: int, rounds: int,
                   idle: list[float]) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    client = Redis.from_url(url)
    try:
        await register_group(client, GROUP)
        scripts = Scripts(client)
        await scripts.load()  # before the first phase: a call that finds the library missing would count its load
        t = Transitions(scripts, lease_ms=600_000, session_ttl=3600)
        measured = [await _round(client, t, n, tokens, index) for index in range(rounds)]
        return measured, [await _after_idle(client, t, n, ms, phase) for phase, ms in enumerate(idle)]
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.tokens < 1:
        raise ValueError("--tokens must be at least 1")
    idle = idle_times(args.idle_ms)
    server = scratch_server()
    try:
        progress(f"{args.rounds} rounds of {args.requests} requests, {args.tokens} tokens each")
        rounds, after_idle = asyncio.run(_measure(server.url, args.requests, args.tokens, args.rounds, idle))
    finally:
        server.stop()
    rows = []
    for index, phases in enumerate(rounds):
        for phase in phases:
            rows.append({"round": index + 1, **phase})
        per_request = {"commands": 0.0, "usec": 0.0}
        for phase in phases:
            share = phase["calls"] / args.requests
            per_request["commands"] += phase["commands_a_call"] * share
            per_request["usec"] += phase["usec_a_call"] * share
        rows.append({"round": index + 1, "phase": "a request, all its calls", "calls": "",
                     "commands_a_call": per_request["commands"], "usec_a_call": per_request["usec"]})
    print(f"\nthe library's calls of a request's life, {args.requests} requests a round, {args.tokens} tokens, "
          "sequential; the last row of a round is a request's total")
    print_table(rows)
    if after_idle:
        print(f"\nthe submit's server time when each call follows a time of idleness, {args.requests} calls each")
        print_table([{"idle_ms": row["idle_ms"], "calls": row["calls"], "commands_a_call": row["commands_a_call"],
                      "usec_a_call": row["usec_a_call"]} for row in after_idle])
    result = {"rows": rows, "after_idle": after_idle,
              "settings": {"requests": args.requests, "tokens": args.tokens, "rounds": args.rounds, "idle_ms": idle}}
    write_result("calls", result)
    return result
