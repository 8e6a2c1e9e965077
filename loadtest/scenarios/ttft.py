"""TTFT added over a direct call: the sim-backend alone against the same sim-backend behind Sluicegate.

Starts `sluicegate sim-backend` and `sluicegate serve --engine openai --backend-url <it>`, then sends
sequential requests, each way of asking for the same completion once a round, in a shuffled order, each
right after a direct call (`round_orders`):
- direct: POST /v1/chat/completions (stream) to the sim-backend;
- chat:   POST /v1/chat/completions (stream) to Sluicegate (submit + stream in one call);
- sse:    POST /v1/sessions/{sid}/requests, then GET /v1/requests/{rid}/events (two round trips);
- against: the chat call to a second Sluicegate running another checkout of the code (`--against DIR`,
  e.g. a `git worktree` of the previous commit, with its own .venv: `python3 -m venv DIR/.venv &&
  DIR/.venv/bin/pip install -e DIR`; a DIR without one is refused, as this tree's python would run a mix of
  both trees there), in front of the same sim-backend; with
  `--against-one-session`, all in one session, whose channel the API then already follows (`--against .`
  measures what a fresh session's creation, subscription and log read add);
- floor:  the chat call through two minimal relays that cross the same processes and sockets as the chat
  route (API, Valkey, worker, backend, and back) with next to no work at each (loadtest/floor_relay.py):
  what the hops alone add on this host, below which no implementation of this design can go;
- floor-one: the floor of another shape, with no worker process (loadtest/floor_relay.py): one relay in the
  API's place stores the request, calls the backend itself once Valkey has acknowledged it, and stores the
  first token before sending it, so Valkey answers the process that asked instead of waking another.
TTFT is from sending the request to receiving the first token; every request is read to its end
before the next starts. Every way through Sluicegate follows a direct call, so none comes right after another
request through Sluicegate, which would find the code both run still warm in the caches of the cores.
The host's noise moves whole runs by a millisecond here; `--against` measures
two versions of the code in one run, request by request, which is how a change is judged.
Targets (DESIGN.md, loadtest/targets.py): added p50 <= 1 ms, added p99 <= 3 ms.
"added" = percentile(via Sluicegate) - percentile(direct), and the paired difference's percentile (each request
against the direct call just before it): neither is the exact percentile of the overhead, so a target is met
only when both readings meet it (the paired p99 runs 0.7 ms above the other on the family-25 host), and
only over >= 100 rounds (a p99 of fewer is their maximum: loadtest/targets.py; fewer print "no verdict").

`--engine-server llamacpp` puts a real engine there instead of the sim-backend: llama-cpp-python's server
(the `engines` extra) with the small generated model of sluicegate.loadtest.engine_servers, which runs one
request at a time (so Sluicegate runs with `--slots 1` unless told otherwise). Each prompt ends in a digit or
an uppercase letter, so the engine answers `--max-tokens` tokens (1-9 or 13-38) and then stops at its
end-of-sequence token (`finish_reason: "stop"`); the streamed text is checked. The sim-only flags
(`--tokens-per-second`, `--prefill-ms`) do not apply; results go to ttft-llamacpp.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sluicegate.loadtest.common import (
    Component,
    ServeProcess,
    client_session,
    cpu_by_role,
    cpu_delta,
    cpu_ticks,
    free_port,
    host_line,
    percentile,
    print_table,
    progress,
    sluicegate_python,
    sse_events,
    steal_percent,
    wait_http,
    wait_model,
    write_result,
)
from sluicegate.loadtest.floor_relay import floor_chain
from sluicegate.loadtest.targets import P99_MIN_SAMPLES, TTFT_ADDED_P50_MS, TTFT_ADDED_P99_MS

MODES = ("direct", "chat", "sse", "floor", "floor-one")
FLOORS = {"floor": False, "floor-one": True}  # mode -> the relay's `one_process`
ENGINE_SERVERS = ("sim", "llamacpp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=200,
                        help="rounds; each sends one request per mode, each through Sluicegate after a direct one")
    parser.add_argument("--warmup", type=int, default=20, help="rounds not counted")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per request (read to the end)")
    parser.add_argument("--tokens-per-second", type=float, default=200.0, help="sim-backend pace")
    parser.add_argument("--prefill-ms", type=float, default=0.0, help="sim-backend delay before the first token")
    parser.add_argument("--modes", default="direct,chat,sse", help=f"which of {','.join(MODES)} to run")
    parser.add_argument("--slots", type=int, default=None,
                        help="worker slots; when not given: 4 with the sim-backend, 1 with llamacpp")
    parser.add_argument("--engine-server", choices=ENGINE_SERVERS, default="sim",
                        help="the server behind Sluicegate: `sluicegate sim-backend`, or llama-cpp-python's server "
                             "with a generated model (needs the engines extra)")
    parser.add_argument("--against", type=Path, default=None, metavar="DIR",
                        help="also run the chat mode against a Sluicegate started from this checkout, with its own "
                             ".venv (mode `against`, interleaved with the others)")
    parser.add_argument("--against-one-session", action="store_true",
                        help="the `against` calls all go to one session, which exists and whose channel its API "
                             "already follows (no subscription, no log read): `--against .` measures their cost")


@dataclass(frozen=True)
class Backend:
    """The engine server behind Sluicegate, and what to ask it."""

    kind: str  # sim | llamacpp
    url: str  # root, without /v1
    model: str  # the model id it serves (the worker declares it: `--backend-model`)
    pid: int
    ending: str = ""  # llamacpp: the prompt's last character, which fixes the answer
    answer: str | None = None  # llamacpp: the text the engine streams before end-of-sequence
    max_tokens: int = 0  # llamacpp: asked for, above the answer's length (the engine stops first)


def chat_body(i: int, max_tokens: int, backend: Backend | None = None) -> dict[str, Any]:
    if backend is None or backend.kind == "sim":
        return {"model": "sim", "stream": True, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"ttft bench question {i}"}]}
    return {"model": backend.model, "stream": True, "max_tokens": backend.max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"ttft bench question {i}, go on from {backend.ending}"}]}


@contextlib.contextmanager
def engine_server(args: argparse.Namespace) -> Iterator[Backend]:
    """The sim-backend, or llama-cpp-python's server with the generated model (removed afterwards)."""
    if args.engine_server == "sim":
        backend_port = free_port()
        backend = Component("sim-backend", ["--port", str(backend_port), "--sim-prefill-ms", str(args.prefill_ms),
                                            "--sim-tokens-per-second", str(args.tokens_per_second)]).start()
        try:
            backend_url = f"http://127.0.0.1:{backend_port}"
            wait_http(f"{backend_url}/v1/models", process=backend.process)
            yield Backend("sim", backend_url, "sim", backend.pid)
        finally:
            backend.stop()
        return
    from sluicegate.loadtest.engine_servers import answer_of_length, generated_llama_server, require_engines

    require_engines("gguf", "numpy", "llama_cpp")
    ending, answer = answer_of_length(args.max_tokens)
    progress("writing the model and starting llama-cpp-python's server")
    with generated_llama_server() as server:
        yield Backend("llamacpp", server.root, server.alias, server.pid, ending, answer, args.max_tokens + 8)


def engine_title(backend: Backend, args: argparse.Namespace) -> str:
    if backend.kind == "sim":
        return (f"engine server sim-backend: prefill {args.prefill_ms:g} ms, {args.tokens_per_second:g} tokens/s, "
                f"{args.max_tokens} tokens per request")
    from sluicegate.loadtest.engine_servers import describe_llama_bench

    return describe_llama_bench(backend.ending, backend.answer or "", args.max_tokens)


async def chat_ttft(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                    headers: dict[str, str] | None = None, expect: str | None = None) -> tuple[float, str | None]:
    """Seconds to the first content chunk of a streamed chat completion, read to its end: an answer that
    fails after its first token (an error chunk) or is cut before `[DONE]` fails the bench, not a sample.
    With `expect`, the streamed text must be that, and end with finish_reason `stop`."""
    began, sent = time.perf_counter(), time.time()
    ttft = None
    text, finish, done = [], None, False
    async with http.post(url, json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        async for event in sse_events(response):
            if event.data == "[DONE]":
                done = True
                break
            chunk = json.loads(event.data)  # every chunk, after the first token too (its time is taken)
            assert "error" not in chunk, chunk
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                if ttft is None:
                    ttft = time.perf_counter() - began
                    WALL[request_id_of(response)] = (sent, time.time())
                text.append(chunk["choices"][0]["delta"]["content"])
            if chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                finish = chunk["choices"][0]["finish_reason"]
        request_id = response.headers.get("x-request-id")
    assert ttft is not None, "no token"
    assert done, (url, "the answer ended without [DONE]")  # a failure's error chunk was refused above
    if expect is not None:
        assert ("".join(text), finish) == (expect, "stop"), (url, "".join(text), finish)
    return ttft, request_id


async def sse_ttft(http: aiohttp.ClientSession, base: str, i: int, max_tokens: int,
                   backend: Backend | None = None) -> tuple[float, str]:
    """Seconds from POST submit to the first `token` event of GET /v1/requests/{id}/events."""
    if backend is None or backend.kind == "sim":
        body: dict[str, Any] = {"messages": chat_body(i, max_tokens)["messages"], "max_tokens": max_tokens}
    else:
        chat = chat_body(i, max_tokens, backend)
        body = {"messages": chat["messages"], "max_tokens": chat["max_tokens"], "params": {"temperature": 0}}
    began, sent = time.perf_counter(), time.time()
    async with http.post(f"{base}/v1/sessions/ttft-{i}/requests", json=body) as response:
        assert response.status == 202, await response.text()
        rid = (await response.json())["request_id"]
    ttft, ended = None, False
    async with http.get(f"{base}/v1/requests/{rid}/events") as response:
        async for event in sse_events(response):
            if event.event == "token" and ttft is None:
                ttft = time.perf_counter() - began
                WALL[rid] = (sent, time.time())
            elif event.event in ("done", "error", "cancelled"):
                assert event.event == "done", event
                ended = True
                break
    assert ttft is not None, "no token"
    assert ended, (rid, "the event stream ended before the request's `done`")
    return ttft, rid


# request id -> (wall clock when the client sent it, when its first token arrived): the hops below
# compare them with the request's own timestamps (Redis's clock: the same host's).
WALL: dict[str, tuple[float, float]] = {}


def request_id_of(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("x-request-id", "")


async def server_side(http: aiohttp.ClientSession, base: str, rid: str | None) -> dict[str, float]:
    """Where the time to a first token went, from the request's own timestamps (ms): the client's send
    to the submit's write in Redis (client, HTTP, API, Redis), the submit to the dispatch (inline on one
    server), the dispatch to the first token's append (worker wake-up, engine, append), and the append
    to the client's receipt (publish, the API's subscriber and fan-out, SSE, client). The dispatch to the
    first append is split by the worker's own timestamps (its clock): to its engine call (itself split at
    the worker's take of the run from its inbox: the rest of the submit's script, Valkey's reply to the
    blocked inbox read and the worker's wake-up, then the worker's own set-up), the engine call to its
    first token (HTTP client, backend), and that token to its append (the worker's hand-over to its
    writer, the append call)."""
    if not rid:
        return {}
    async with http.get(f"{base}/v1/requests/{rid}") as response:
        view = await response.json()
    sub, started, first = view.get("submitted_at"), view.get("started_at"), view.get("first_token_at")
    if None in (sub, started, first):
        return {}
    hops = {"submit_to_dispatch": (started - sub) * 1000, "dispatch_to_first_append": (first - started) * 1000}
    called, answered = view.get("backend_called_at"), view.get("backend_first_token_at")
    taken = view.get("worker_took_at")
    if called is not None and answered is not None and view.get("attempts") == 1:  # else started_at is another's
        hops.update(dispatch_to_engine_call=(called - started) * 1000)
        if taken is not None:  # the dispatch to the worker's inbox read, then its own set-up to the call
            hops.update(dispatch_to_worker_take=(taken - started) * 1000,
                        worker_take_to_engine_call=(called - taken) * 1000)
        hops.update(engine_call_to_first_token=(answered - called) * 1000,
                    engine_first_token_to_append=(first - answered) * 1000)
    wall = WALL.pop(rid, None)
    if wall is not None:
        hops = {"send_to_submit": (sub - wall[0]) * 1000, **hops, "append_to_client": (wall[1] - first) * 1000}
    return hops


def round_orders(modes: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """Each round's calls: every mode but `direct` once, in a seeded shuffle (a rerun repeats it), each right
    after a direct call when `direct` is among the modes. A request through Sluicegate runs faster right after
    another one than after a direct call (the code both run is still warm in the 2 cores' caches), so no mode
    may follow another: with a rotation, `against` followed `chat` or `sse` where `chat` followed `direct`,
    and `--against` the same tree read +0.08 ms (`--modes direct,chat`) and +0.22 ms (`direct,chat,sse`) for
    the `against` slot; with a shuffle alone, +0.16 and -0.20 ms (a pair's difference then swings by the
    order inside its round)."""
    rng = random.Random(seed)
    others = [m for m in modes if m != "direct"]
    lead = ["direct"] if "direct" in modes else []
    if not others:
        return [list(lead) for _ in range(rounds)]
    return [[call for mode in rng.sample(others, len(others)) for call in (*lead, mode)] for _ in range(rounds)]


async def measure(backend: Backend, base: str, other: str | None, floors: dict[str, str],
                  args: argparse.Namespace) -> dict[str, Any]:
    modes = [m for m in args.modes.split(",") if m] + (["against"] if other else [])
    ttft: dict[str, list[float]] = {m: [] for m in modes}
    inside: dict[str, list[float]] = {}  # "<mode> <hop>" -> ms (server_side)
    before: dict[str, list[float]] = {m: [] for m in modes if m != "direct"}  # the direct call just before each
    counter = itertools.count()
    expect = backend.answer  # None with the sim-backend: its text is not checked
    # One keep-alive client per target, as a real caller (or a gateway in front) would hold.
    async with (client_session(4) as direct_http, client_session(4) as sg_http, client_session(4) as other_http,
                client_session(4) as floor_http):
        for round_no, order in enumerate(round_orders(modes, args.warmup + args.rounds)):
            counted = round_no >= args.warmup
            last_direct = None
            for mode in order:
                i = next(counter)
                rid = None
                body = chat_body(i, args.max_tokens, backend)
                if mode == "direct":
                    seconds, _ = await chat_ttft(direct_http, f"{backend.url}/v1/chat/completions", body,
                                                 expect=expect)
                elif mode == "chat":
                    seconds, rid = await chat_ttft(sg_http, f"{base}/v1/chat/completions", body,
                                                   {"X-Session-Id": f"ttft-c{i}"}, expect=expect)
                elif mode == "against":  # its hops too: both trees, split the same way, in one run
                    assert other is not None
                    session = "ttft-a" if args.against_one_session else f"ttft-a{i}"
                    seconds, rid = await chat_ttft(other_http, f"{other}/v1/chat/completions", body,
                                                   {"X-Session-Id": session}, expect=expect)
                elif mode in FLOORS:  # the relays pass on the first token only: no text to check
                    seconds, _ = await chat_ttft(floor_http, f"{floors[mode]}/v1/chat/completions", body)
                else:
                    seconds, rid = await sse_ttft(sg_http, base, i, args.max_tokens, backend)
                if counted:
                    ttft[mode].append(seconds * 1000)
                    if mode == "direct":
                        last_direct = seconds * 1000
                    elif last_direct is not None:
                        before[mode].append(last_direct)
                    view = (other_http, other) if mode == "against" else (sg_http, base)
                    for name, ms in (await server_side(*view, rid)).items():
                        inside.setdefault(f"{mode} {name}", []).append(ms)
            if counted and (round_no - args.warmup + 1) % max(1, args.rounds // 5) == 0:
                progress(f"round {round_no - args.warmup + 1}/{args.rounds}")
    return {"ttft": ttft, "inside": inside, "before": before}


def added_verdict(a: dict[str, float], requests: int) -> tuple[dict[str, bool | None], str]:
    """({p50_target_met, p99_target_met}, why no verdict) for one way's added TTFT, judged by the stricter of its
    two readings (the module's docstring); None for both when fewer than P99_MIN_SAMPLES requests were paired."""
    if requests < P99_MIN_SAMPLES:
        return ({"p50_target_met": None, "p99_target_met": None},
                f"too short ({requests} requests; a p99 needs >= {P99_MIN_SAMPLES}, --rounds)")
    p50, p99 = max(a["p50_ms"], a["paired_p50_ms"]), max(a["p99_ms"], a["paired_p99_ms"])
    return {"p50_target_met": p50 <= TTFT_ADDED_P50_MS, "p99_target_met": p99 <= TTFT_ADDED_P99_MS}, ""


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.slots is None:
        args.slots = 4 if args.engine_server == "sim" else 1  # llama-cpp-python runs one request at a time
    serve = other = None
    unknown = set(args.modes.split(",")) - set(MODES) - {""}
    if unknown:
        raise SystemExit(f"sluicegate bench ttft: unknown mode {', '.join(sorted(unknown))} (of {','.join(MODES)})")
    if args.against:
        sluicegate_python(args.against.resolve())  # CheckoutRefused before anything starts
    with engine_server(args) as backend, contextlib.ExitStack() as chain:
        floors = {mode: chain.enter_context(floor_chain(backend.url, one_process=one))
                  for mode, one in FLOORS.items() if mode in args.modes.split(",")}
        try:
            flags = ["--engine", "openai", "--backend-url", f"{backend.url}/v1", "--backend-model", backend.model,
                     "--workers", "1", "--slots", str(args.slots)]  # the worker declares chat_body's model
            serve = ServeProcess(flags=flags).start()
            if args.against:
                other = ServeProcess(flags=flags, checkout=args.against.resolve()).start()
            for stack in (serve, other):  # its worker is up (it probes the engine first) and declared the model
                if stack is not None:
                    wait_model(stack.base_url, backend.model)
            cpu0 = cpu_by_role([serve.process.pid, backend.pid])  # type: ignore[union-attr]
            ticks0 = cpu_ticks()
            load0 = os.getloadavg()
            began = time.perf_counter()
            outcome = asyncio.run(measure(backend, serve.base_url, other.base_url if other else None, floors, args))
            elapsed = time.perf_counter() - began
            steal = steal_percent(ticks0, cpu_ticks())
            load1 = os.getloadavg()
            cpu = cpu_delta(cpu0, cpu_by_role([serve.process.pid, backend.pid]))  # type: ignore[union-attr]
        finally:
            for stack in (serve, other):
                if stack is not None:
                    stack.stop()
        title = engine_title(backend, args)
    ttft = outcome["ttft"]
    rows = [{"mode": m, "requests": len(v), "p50_ms": percentile(v, 50), "p90_ms": percentile(v, 90),
             "p99_ms": percentile(v, 99), "max_ms": max(v)} for m, v in ttft.items()]
    added: dict[str, dict[str, float]] = {}
    if "direct" in ttft:
        direct = ttft["direct"]
        for mode in (m for m in ttft if m != "direct"):
            paired = [via - d for via, d in zip(ttft[mode], outcome["before"][mode], strict=True)]
            added[mode] = {"p50_ms": percentile(ttft[mode], 50) - percentile(direct, 50),
                           "p99_ms": percentile(ttft[mode], 99) - percentile(direct, 99),
                           "paired_p50_ms": percentile(paired, 50), "paired_p99_ms": percentile(paired, 99),
                           "requests": len(paired)}
            rows.append({"mode": f"{mode} - direct", "requests": len(paired), "p50_ms": added[mode]["p50_ms"],
                         "p99_ms": added[mode]["p99_ms"]})
            rows.append({"mode": f"{mode} - direct, paired", "requests": len(paired),
                         "p50_ms": added[mode]["paired_p50_ms"], "p90_ms": percentile(paired, 90),
                         "p99_ms": added[mode]["paired_p99_ms"], "max_ms": max(paired)})
    if "chat" in ttft and "against" in ttft:  # this code against the other checkout, round by round
        paired = [a - b for a, b in zip(ttft["chat"], ttft["against"], strict=True)]
        rows.append({"mode": "chat - against, paired", "requests": len(paired),
                     "p50_ms": percentile(paired, 50), "p90_ms": percentile(paired, 90)})
    inside = {name: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)}
              for name, v in outcome["inside"].items() if v}
    print(f"\nTTFT, sequential, {title}, {args.rounds} rounds, {args.slots} slot{'s' if args.slots != 1 else ''}")
    print_table(rows, ["mode", "requests", "p50_ms", "p90_ms", "p99_ms", "max_ms"])
    if inside:
        print("\nper hop (the request's own timestamps against the client's clock, same host):")
        print_table([{"span": k, **v} for k, v in inside.items()])
    print(f"\nCPU seconds over {elapsed:.1f} s: {cpu}")
    if "direct" in ttft:  # how quiet the host was: only quiet runs compare with each other
        direct = ttft["direct"]
        print(f"{host_line(steal, load0[0], load1[0])}; the direct call alone p50 {percentile(direct, 50):.2f} ms, "
              f"p90 {percentile(direct, 90):.2f} ms")
    verdicts = {}
    added_floor = added.pop("floor", None)  # not Sluicegate: what its design's hops cost with nothing done at them
    added_floor_one = added.pop("floor-one", None)  # nor this: the hops of a shape with no worker process
    if added_floor is not None:
        print(f"floor (the same hops, next to no work at each): added p50 {added_floor['p50_ms']:.2f} ms, "
              f"p99 {added_floor['p99_ms']:.2f} ms, paired p50 {added_floor['paired_p50_ms']:.2f} ms")
        for mode in (m for m in ("chat", "sse") if m in added):
            print(f"{mode} above the floor: p50 {added[mode]['p50_ms'] - added_floor['p50_ms']:+.2f} ms, "
                  f"p99 {added[mode]['p99_ms'] - added_floor['p99_ms']:+.2f} ms")
    if added_floor_one is not None:
        print(f"floor-one (no worker process: the API's place calls the backend itself): added p50 "
              f"{added_floor_one['p50_ms']:.2f} ms, p99 {added_floor_one['p99_ms']:.2f} ms, paired p50 "
              f"{added_floor_one['paired_p50_ms']:.2f} ms")
    for mode, a in added.items():  # judged by the stricter of the two readings (the module's docstring)
        verdicts[mode], why = added_verdict(a, int(a["requests"]))
        met = verdicts[mode]["p50_target_met"] and verdicts[mode]["p99_target_met"]
        print(f"{mode}: added p50 {a['p50_ms']:.2f} ms (paired {a['paired_p50_ms']:.2f}; target "
              f"{TTFT_ADDED_P50_MS:g}), added p99 {a['p99_ms']:.2f} ms (paired {a['paired_p99_ms']:.2f}; target "
              f"{TTFT_ADDED_P99_MS:g}): {f'no verdict: {why}' if why else 'met' if met else 'MISSED'}")
    result = {"rows": rows, "added": added, "floor_added": added_floor, "floor_one_added": added_floor_one,
              "verdicts": verdicts, "inside_ms": inside,
              "cpu_seconds": cpu,
              "targets_ms": {"added_p50": TTFT_ADDED_P50_MS, "added_p99": TTFT_ADDED_P99_MS},
              "steal_percent": steal, "load_average": {"before": list(load0), "after": list(load1)},
              "seconds": round(elapsed, 2), "engine_server": title,
              "settings": {"rounds": args.rounds, "max_tokens": args.max_tokens, "prefill_ms": args.prefill_ms,
                           "tokens_per_second": args.tokens_per_second, "slots": args.slots,
                           "engine_server": args.engine_server,
                           "against": str(args.against) if args.against else None,
                           "against_one_session": args.against_one_session},
              "samples_ms": {m: [round(x, 3) for x in v] for m, v in ttft.items()}}
    write_result("ttft" if args.engine_server == "sim" else f"ttft-{args.engine_server}", result)
    return result
