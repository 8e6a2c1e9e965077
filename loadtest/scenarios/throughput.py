"""End-to-end throughput: completed 1-token requests per second with 64 concurrent clients.

Against `sluicegate serve` (sim engine, prefill 0). Each client loops: submit a request into its own
session, stream the request's events until `done`, repeat. Counted: requests that completed inside
the measured window (after a warm-up). Reported beside the rate: latency (submit to `done`), the
client's own CPU seconds (in this process; `--client`, loadtest/bench_http.py) and the CPU seconds of
every server process, by role, so the bottleneck is visible. Target (DESIGN.md): >= 1,000 completed
requests/s with 32 clients on the chat route in front of a real streaming server, 2 cores (other
setups get no verdict); with `--mode both`, the resumable route (submit + GET events) >= 80% of the
chat route, "the same" setup (`--engine-server sim-backend --clients 32`, 2 cores: the two routes in
alternating phases behind one `serve`; other setups print the share with no verdict). A verdict also needs
each measured phase to run >= 10 s (shorter: "no verdict: too short"), and a phase that completed nothing or
failed more than 0.1% of what it completed makes it a miss whatever the rate (loadtest/targets.py).

`--engine-server llamacpp` puts a real engine behind Sluicegate instead of the sim engine: llama-cpp-python's
server (the `engines` extra) with the small generated model of sluicegate.loadtest.engine_servers, through
`--engine openai`. That engine runs one request at a time, so Sluicegate runs 1 worker x 1 slot and 4
clients by default (enough to keep a request always waiting in Sluicegate: the rate then shows the gap
Sluicegate leaves between the engine's requests). Each prompt ends in a digit or an uppercase letter, so
the engine answers `--max-tokens` tokens (1-9 or 13-38) and stops at its end-of-sequence token. The same
clients first run against the engine directly (POST /v1/chat/completions, streamed): the baseline.
DESIGN's 1,000 req/s target is for 32 clients on the chat route in front of a real streaming server
(`--engine-server sim-backend --max-tokens 16 --clients 32`); other setups print their rate with no
verdict. With llamacpp the figure is the share of the direct rate.
Results go to throughput-llamacpp.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from sluicegate.loadtest.bench_http import CLIENTS, BenchHTTP, bench_http, run_on_loop
from sluicegate.loadtest.common import (
    ServeProcess,
    cpu_by_role,
    cpu_delta,
    cpu_seconds,
    cpu_ticks,
    host_line,
    percentile,
    print_table,
    progress,
    steal_percent,
    wait_model,
    write_result,
)
from sluicegate.loadtest.targets import (
    CHAT_CLIENTS,
    CHAT_MAX_TOKENS,
    CHAT_REQUESTS_PER_S,
    RESUMABLE_SHARE_OF_CHAT,
    THROUGHPUT_MAX_ERROR_SHARE,
    THROUGHPUT_MIN_PHASE_S,
)

ENGINE_SERVERS = ("sim", "llamacpp", "sim-backend")
PROMPT = "throughput bench"
# The defaults per engine server: (clients, workers, slots). In front of the sim-backend, one worker of
# 64 slots: on 2 cores it took 6% less server CPU per request than 2 x 32 (3 interleaved pairs,
# 2026-12-04; one process batches more of its runs' Redis calls into one write, and switches less).
DEFAULTS = {"sim": (64, 2, 32), "llamacpp": (4, 1, 1), "sim-backend": (32, 1, 64)}
JSON = {"content-type": "application/json"}

One = Callable[[BenchHTTP, str], Awaitable[int]]  # (http, session id) -> tokens streamed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=None,
                        help="concurrent clients; when not given: 64 with sim, 4 with llamacpp")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens per request")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes; when not given: 2 with sim, 1 with llamacpp or sim-backend")
    parser.add_argument("--slots", type=int, default=None,
                        help="slots per worker; when not given: 32 with sim, 1 with llamacpp, 64 with sim-backend")
    parser.add_argument("--mode", choices=("sse", "chat", "both"), default=None,
                        help="sse: POST submit + GET request events; chat: POST /v1/chat/completions stream; "
                             "both: the two against the same server in one run, in alternating phases; "
                             "when not given: chat with sim-backend (DESIGN's row), else sse")
    parser.add_argument("--rounds", type=int, default=2,
                        help="with --mode both: chat-then-sse rounds, each phase --duration/rounds seconds")
    parser.add_argument("--session-per-request", action="store_true",
                        help="a new session for every request (default: one session per client)")
    parser.add_argument("--serve-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for `sluicegate serve` (repeat), e.g. --serve-flag=--appendfsync=always")
    parser.add_argument("--client", choices=CLIENTS, default="lean",
                        help="the load client (loadtest/bench_http.py): lean (the engine's HTTP/1.1 client on "
                             "uvloop) or aiohttp (on asyncio's loop, as figures before 2026-12-04 were taken)")
    parser.add_argument("--engine-server", choices=ENGINE_SERVERS, default="sim",
                        help="what generates: Sluicegate's own sim engine, or llama-cpp-python's server with a "
                             "generated model behind `--engine openai` (needs the engines extra)")


async def one_sse(http: BenchHTTP, base: str, sid: str, max_tokens: int, prompt: str = PROMPT,
                  params: dict[str, Any] | None = None) -> int:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens}
    if params:
        body["params"] = params
    status, data = await http.fetch("POST", f"{base}/v1/sessions/{sid}/requests", orjson.dumps(body), JSON)
    if status != 202:
        raise RuntimeError(f"submit: {status} {data[:500]!r}")
    rid = orjson.loads(data)["request_id"]
    # The request stream closes after its terminal event: read it whole and count in the bytes (parsing
    # each event in Python would cost the client, which shares the cores, more than the check is worth).
    status, data = await http.fetch("GET", f"{base}/v1/requests/{rid}/events")
    if status != 200:
        raise RuntimeError(f"events: {status} {data[:500]!r}")
    if b"\nevent: done\n" not in b"\n" + data:
        raise RuntimeError(f"stream ended without done: {data[-200:]!r}")
    return data.count(b"event: token\n")


async def one_chat(http: BenchHTTP, base: str, sid: str, max_tokens: int, prompt: str = PROMPT,
                   params: dict[str, Any] | None = None, model: str | None = None) -> int:
    body: dict[str, Any] = {"stream": True, "max_tokens": max_tokens,  # no model: the group `default`
                            "messages": [{"role": "user", "content": prompt}], **(params or {})}
    if model:
        body["model"] = model
    status, data = await http.fetch("POST", f"{base}/v1/chat/completions", orjson.dumps(body),
                                    {**JSON, "x-session-id": sid})
    if status != 200:
        raise RuntimeError(f"chat: {status} {data[:500]!r}")
    tokens, done = 0, False
    for line in data.split(b"\n"):
        if line == b"data: [DONE]":
            done = True
        elif line.startswith(b"data: {"):
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"chat stream error: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                tokens += 1
    if not done:
        raise RuntimeError(f"chat stream ended without [DONE]: {data[-200:]!r}")
    return tokens


async def measure(one: One, roots: list[int], expected: int, args: argparse.Namespace) -> dict[str, Any]:
    """`args.clients` clients calling `one` in a loop; `expected` tokens (content chunks) each."""
    finished: list[tuple[float, float]] = []  # (end time, latency seconds)
    errors: list[str] = []
    stop = asyncio.Event()

    async def client(http: BenchHTTP, c: int) -> None:
        n = 0
        while not stop.is_set():
            sid = f"tp-{c}-{n}" if args.session_per_request else f"tp-{c}"
            n += 1
            began = time.perf_counter()
            try:
                tokens = await one(http, sid)
                if tokens != expected:
                    raise RuntimeError(f"{tokens} tokens, expected {expected}")
            except Exception as error:  # a failed request is a reported failure, not a crash
                errors.append(f"{type(error).__name__}: {error}")
                await asyncio.sleep(0.05)
                continue
            ended = time.perf_counter()
            finished.append((ended, ended - began))

    http = bench_http(args.client, args.clients * 2)
    try:
        tasks = [asyncio.create_task(client(http, c)) for c in range(args.clients)]
        progress(f"{args.clients} clients, warm-up {args.warmup:g} s")
        await asyncio.sleep(args.warmup)
        t0, client0, server0 = time.perf_counter(), cpu_seconds(), cpu_by_role(roots)
        ticks0, load0 = cpu_ticks(), os.getloadavg()
        ticks = max(1, int(args.duration // 5))
        for k in range(ticks):
            await asyncio.sleep(args.duration / ticks)
            done = sum(1 for end, _ in finished if end >= t0)
            progress(f"{(k + 1) * args.duration / ticks:.0f}/{args.duration:g} s: {done} completed, "
                     f"{len(errors)} errors")
        t1, client1, server1 = time.perf_counter(), cpu_seconds(), cpu_by_role(roots)
        steal, load1 = steal_percent(ticks0, cpu_ticks()), os.getloadavg()
        stop.set()
        await asyncio.wait(tasks, timeout=30)
    finally:
        await http.aclose()
    window = [lat for end, lat in finished if t0 <= end <= t1]
    return {"completed": len(window), "seconds": t1 - t0, "latencies": window, "errors": errors,
            "client_cpu": client1 - client0, "server_cpu": cpu_delta(server0, server1), "steal_percent": steal,
            "load_average": (load0[0], load1[0])}


def measure_on_loop(one: One, roots: list[int], expected: int, args: argparse.Namespace) -> dict[str, Any]:
    """`measure` on the loop of the client that `--client` names."""
    return run_on_loop(args.client, lambda: measure(one, roots, expected, args))


def row_of(out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    ms = [x * 1000 for x in out["latencies"]]
    return {"clients": args.clients, "mode": args.mode, "completed": out["completed"],
            "req_per_s": out["completed"] / out["seconds"], "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "errors": len(out["errors"]), "client_cpu_s": out["client_cpu"],
            "client_cpu_ms_per_req": 1000 * out["client_cpu"] / max(1, out["completed"])}


def print_cpu(out: dict[str, Any]) -> None:
    print_table([{"role": role, "cpu_s": s, "cores": s / out["seconds"],
                  "cpu_ms_per_req": 1000 * s / max(1, out["completed"])}
                 for role, s in out["server_cpu"].items() if s > 0])


def run_host_line(out: dict[str, Any]) -> str:
    before, after = out["load_average"]
    return host_line(out["steal_percent"], before, after)


DESIGN_CORES = 2  # DESIGN's throughput rows: "32 clients, 2 cores"


def cores() -> int:
    """The cores this process may run on (its affinity: a container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def design_setup(args: argparse.Namespace) -> bool:
    """The setup both of DESIGN's throughput rows are for: 32 clients, 2 cores, 16-token answers, in front of a
    real streaming server at 1,000 tokens/s (`--engine-server sim-backend --max-tokens 16`). The resumable
    row is "the same on the resumable route". A shorter answer does a request's per-token work fewer times:
    an easier figure, which gets no verdict."""
    return (args.clients == CHAT_CLIENTS and args.engine_server == "sim-backend"
            and args.max_tokens == CHAT_MAX_TOKENS and cores() == DESIGN_CORES)


def setup_said(args: argparse.Namespace, mode: str) -> str:
    return (f"this run had {args.clients} clients on {cores()} cores, the {mode} route, {args.max_tokens}-token "
            f"answers, engine server {args.engine_server}")


@dataclass(frozen=True)
class Phase:
    """One measured phase behind a figure: a rate is judged only when each of its phases ran long enough,
    completed requests and failed (almost) none."""

    route: str
    round: int  # 1-based
    completed: int
    seconds: float
    errors: int


def phase_of(route: str, round_no: int, out: dict[str, Any]) -> Phase:
    """The phase that `measure` reported as `out`."""
    return Phase(route, round_no, out["completed"], out["seconds"], len(out["errors"]))


def phases_verdict(phases: Sequence[Phase]) -> tuple[bool | None, str]:
    """(whether the phases may be judged on their figure, why not): None when a phase measured less than
    THROUGHPUT_MIN_PHASE_S (too short to judge), False when a phase completed nothing or failed more than
    THROUGHPUT_MAX_ERROR_SHARE of what it completed (a serve that died mid-run is a miss whatever the phases
    before it did). The seconds are taken to 0.1 s: the loop's timers may end a phase a few ms early."""
    if not phases:
        return None, "too short (nothing measured)"
    for p in phases:
        if round(p.seconds, 1) < THROUGHPUT_MIN_PHASE_S:
            return None, (f"too short (the {p.route} phase of round {p.round} measured {p.seconds:.2f} s; a verdict "
                          f"needs >= {THROUGHPUT_MIN_PHASE_S:g} s a phase)")
    for p in phases:
        if p.completed == 0:
            return False, f"the {p.route} phase of round {p.round} completed 0 requests ({p.errors} failed)"
        if p.errors > THROUGHPUT_MAX_ERROR_SHARE * p.completed:
            return False, (f"the {p.route} phase of round {p.round} had {p.errors} failed requests to "
                           f"{p.completed} completed (allowed <= {THROUGHPUT_MAX_ERROR_SHARE:.1%})")
    return True, ""


def judged(as_target: bool, reached: bool, target: str,
           phases: Sequence[Phase]) -> tuple[bool | None, str, str]:
    """A figure's verdict in the target's setup (`as_target`): met when it `reached` the `target` and its
    measured phases let it be judged (`phases_verdict`), a miss when they failed, none when too short; with
    the verdict's reason and its line (empty outside the setup: the caller says why)."""
    measured, why = phases_verdict(phases)
    if not as_target:
        return None, why, ""
    if measured is None:
        return None, why, f"no verdict: {why}"
    if measured is False:
        return False, why, f"target >= {target} (MISSED: {why})"
    return reached, why, f"target >= {target} ({'met' if reached else 'MISSED'})"


def target_line(rate: float, args: argparse.Namespace, mode: str = "chat", *,
                phases: Sequence[Phase]) -> tuple[str, dict[str, Any]]:
    """The verdict against DESIGN's chat-route figure, given only for the setup that figure is for (the chat
    route in `design_setup`) and for `phases` (the route's measured phases) that `phases_verdict` lets be
    judged, and its JSON fields (`target_met` is None for another setup or too short a run). `phases` is
    required: a rate is never judged apart from what measured it."""
    as_target = design_setup(args) and mode == "chat"
    met, why, line = judged(as_target, rate >= CHAT_REQUESTS_PER_S, f"{CHAT_REQUESTS_PER_S:,}", phases)
    if not as_target:
        line = (f"no verdict: DESIGN's {CHAT_REQUESTS_PER_S:,} is for {CHAT_CLIENTS} clients on the chat route, "
                f"{DESIGN_CORES} cores, {CHAT_MAX_TOKENS}-token answers from a real streaming server "
                f"(--engine-server sim-backend --max-tokens {CHAT_MAX_TOKENS}); {setup_said(args, mode)}")
    return line, {"target": CHAT_REQUESTS_PER_S, "target_met": met, "setup_as_target": as_target,
                  "verdict_reason": why or None,
                  "target_setup": {"clients": CHAT_CLIENTS, "mode": "chat", "engine_server": "sim-backend",
                                   "max_tokens": CHAT_MAX_TOKENS, "cores": DESIGN_CORES}}


def share_line(share: float, args: argparse.Namespace, *,
               phases: Sequence[Phase]) -> tuple[str, dict[str, Any]]:
    """The verdict on the resumable route's share of the chat route (DESIGN: >= 80%), given only for
    `design_setup` with the routes in alternating phases (`--rounds` 2 or more: with one round the chat
    phase always runs first, on a freshly started serve) and for `phases` (both routes' measured phases) that
    `phases_verdict` lets be judged, and its JSON fields (`target_met` is None otherwise). `phases` is
    required: a share is never judged apart from what measured it."""
    as_target = design_setup(args) and args.rounds >= 2
    met, why, line = judged(as_target, share >= RESUMABLE_SHARE_OF_CHAT, f"{RESUMABLE_SHARE_OF_CHAT:.0%}", phases)
    if not as_target:
        line = (f"no verdict: DESIGN's {RESUMABLE_SHARE_OF_CHAT:.0%} is for the chat row's setup ({CHAT_CLIENTS} "
                f"clients, {DESIGN_CORES} cores, --engine-server sim-backend --max-tokens {CHAT_MAX_TOKENS}), "
                f"the routes alternating (--rounds 2 or more); {setup_said(args, 'both')}, "
                f"{args.rounds} round{'s' if args.rounds != 1 else ''}")
    return line, {"sse_share_of_chat": round(share, 3), "target_share": RESUMABLE_SHARE_OF_CHAT,
                  "target_met": met, "setup_as_target": as_target, "verdict_reason": why or None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    clients, workers, slots = DEFAULTS[args.engine_server]
    args.clients = clients if args.clients is None else args.clients
    args.workers = workers if args.workers is None else args.workers
    args.slots = slots if args.slots is None else args.slots
    args.mode = args.mode or ("chat" if args.engine_server == "sim-backend" else "sse")
    if args.engine_server == "llamacpp":
        return run_llamacpp(args)
    if args.engine_server == "sim-backend":
        return run_sim_backend(args)
    flags = ["--workers", str(args.workers), "--slots", str(args.slots), "--sim-prefill-ms", "0",
             "--sim-tokens-per-second", "1000", *args.serve_flag]
    if args.mode == "both":
        return run_both(args, flags)
    serve = ServeProcess(flags=flags).start()
    base = serve.base_url
    if args.mode == "sse":
        async def one(http: BenchHTTP, sid: str) -> int:
            return await one_sse(http, base, sid, args.max_tokens)
    else:
        async def one(http: BenchHTTP, sid: str) -> int:
            return await one_chat(http, base, sid, args.max_tokens)
    try:
        out = measure_on_loop(one, [serve.process.pid], args.max_tokens, args)  # type: ignore[union-attr]
    finally:
        serve.stop()
    rate = out["completed"] / out["seconds"]
    cpu = out["server_cpu"]
    rows = [row_of(out, args)]
    print(f"\n{args.max_tokens}-token requests end to end over {out['seconds']:.1f} s "
          f"({args.workers} workers x {args.slots} slots), engine: Sluicegate's sim")
    print_table(rows)
    print("\nserver CPU seconds in the window, by process role (cores = seconds / window):")
    print_cpu(out)
    if out["errors"]:
        print(f"first errors: {out['errors'][:3]}")
    print(run_host_line(out))
    phases = [phase_of(args.mode, 1, out)]
    line, verdict = target_line(rate, args, args.mode, phases=phases)
    print(f"\n{rate:.0f} completed requests/s: {line}")
    result = {"rows": rows, "req_per_s": round(rate, 1), **verdict, "server_cpu_seconds": cpu,
              "phases": [asdict(p) for p in phases],
              "errors": out["errors"][:20],
              "steal_percent": out["steal_percent"], "load_average": out["load_average"],
              "settings": {**{k: v for k, v in vars(args).items() if k != "func"}, "serve_flags": flags}}
    write_result("throughput", result)
    return result


def run_both(args: argparse.Namespace, flags: list[str]) -> dict[str, Any]:
    """The resumable route against the chat route on the same server in one run (DESIGN.md: >= 80%).
    The phases alternate (chat, sse, chat, sse, ...), so a neighbour's load on the shared cores falls on
    both routes alike; each phase has its own warm-up."""
    serve = ServeProcess(flags=flags).start()
    base = serve.base_url
    try:
        merged = alternate(routes(base, args.max_tokens), [serve.process.pid], args.max_tokens, args)  # type: ignore[union-attr]
    finally:
        serve.stop()
    rows = [row_of(merged[mode], argparse.Namespace(**{**vars(args), "mode": mode})) for mode in ("chat", "sse")]
    rates = {mode: merged[mode]["completed"] / merged[mode]["seconds"] for mode in merged}
    share = rates["sse"] / rates["chat"] if rates["chat"] else float("nan")
    print(f"\n{args.max_tokens}-token requests end to end, {args.rounds} alternating rounds of "
          f"{args.duration / max(1, args.rounds):g} s per route ({args.workers} workers x {args.slots} slots), "
          f"engine: Sluicegate's sim")
    print_table(rows)
    print_runs_cpu({f"{mode} phases": out for mode, out in merged.items()})
    phases = [p for out in merged.values() for p in out["phases"]]
    line, verdict = share_line(share, args, phases=phases)
    print(f"\nresumable route (submit + GET events) {rates['sse']:.0f} req/s = {100 * share:.0f}% of the chat "
          f"route's {rates['chat']:.0f} req/s: {line}")
    result = {"rows": rows, "req_per_s": {m: round(r, 1) for m, r in rates.items()}, **verdict,
              "phases": [asdict(p) for p in phases],
              "server_cpu_seconds": {m: merged[m]["server_cpu"] for m in merged},
              "errors": {m: merged[m]["errors"][:20] for m in merged},
              "steal_percent": {m: merged[m]["steal_percent"] for m in merged},
              "load_average": {m: merged[m]["load_average"] for m in merged},
              "settings": {**{k: v for k, v in vars(args).items() if k != "func"}, "serve_flags": flags}}
    write_result("throughput-both", result)
    return result


def routes(base: str, max_tokens: int, model: str | None = None) -> dict[str, One]:
    """One request on each route through Sluicegate at `base`: chat, and the resumable route (sse)."""
    return {"chat": lambda http, sid: one_chat(http, base, sid, max_tokens, model=model),
            "sse": lambda http, sid: one_sse(http, base, sid, max_tokens)}


def alternate(ones: dict[str, One], roots: list[int], expected: int,
              args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each route of `ones` measured in turn, `args.rounds` rounds of `args.duration / rounds` seconds a
    phase (chat, sse, chat, sse, ...), so a neighbour's load on the shared cores falls on both routes
    alike; each phase has its own warm-up. Returns each route's phases merged, as `measure` reports one,
    with each phase as a `Phase` under "phases" (what a verdict needs of each)."""
    phase = argparse.Namespace(**{**vars(args), "duration": args.duration / max(1, args.rounds)})
    outs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in ones}
    for r in range(max(1, args.rounds)):
        for mode, one in ones.items():
            progress(f"round {r + 1}/{args.rounds}: {mode}")
            outs[mode].append(measure_on_loop(one, roots, expected, phase))
    merged: dict[str, dict[str, Any]] = {}
    for mode, parts in outs.items():
        cpu: dict[str, float] = {}
        for part in parts:
            for role, s in part["server_cpu"].items():
                cpu[role] = cpu.get(role, 0.0) + s
        merged[mode] = {"completed": sum(p["completed"] for p in parts), "seconds": sum(p["seconds"] for p in parts),
                        "latencies": [x for p in parts for x in p["latencies"]],
                        "errors": [e for p in parts for e in p["errors"]],
                        "client_cpu": sum(p["client_cpu"] for p in parts), "server_cpu": cpu,
                        "steal_percent": max(p["steal_percent"] for p in parts),
                        "load_average": (parts[0]["load_average"][0], parts[-1]["load_average"][1]),
                        "phases": [phase_of(mode, r + 1, p) for r, p in enumerate(parts)]}
    return merged


def run_llamacpp(args: argparse.Namespace) -> dict[str, Any]:
    """The same clients against llama-cpp-python's server directly, then through Sluicegate in front of it."""
    from sluicegate.loadtest.engine_servers import (
        answer_of_length,
        describe_llama_bench,
        generated_llama_server,
        require_engines,
    )

    require_engines("gguf", "numpy", "llama_cpp")
    ending, answer = answer_of_length(args.max_tokens)
    prompt = f"{PROMPT}, go on from {ending}"
    asked = args.max_tokens + 8  # above the answer: the engine stops at its end-of-sequence first
    expected = len(answer)  # content chunks: the engine streams one per character
    greedy = {"temperature": 0}
    progress("writing the model and starting llama-cpp-python's server")
    with generated_llama_server() as server:
        async def direct(http: BenchHTTP, sid: str) -> int:
            return await one_chat(http, server.root, sid, asked, prompt, greedy, model=server.alias)

        progress("the engine alone (POST /v1/chat/completions, streamed)")
        direct_out = measure_on_loop(direct, [server.pid], expected, args)
        flags = ["--engine", "openai", "--backend-url", server.url, "--backend-model", server.alias,
                 "--workers", str(args.workers), "--slots", str(args.slots), *args.serve_flag]
        serve = ServeProcess(flags=flags).start()
        base = serve.base_url
        if args.mode == "sse":
            async def via(http: BenchHTTP, sid: str) -> int:
                return await one_sse(http, base, sid, asked, prompt, greedy)
        else:
            async def via(http: BenchHTTP, sid: str) -> int:
                return await one_chat(http, base, sid, asked, prompt, greedy)
        try:
            wait_model(base, server.alias)  # its worker is up (it probes the engine first)
            progress(f"through Sluicegate ({args.mode})")
            out = measure_on_loop(via, [serve.process.pid, server.pid], expected, args)  # type: ignore[union-attr]
        finally:
            serve.stop()
    rate, direct_rate = (o["completed"] / o["seconds"] for o in (out, direct_out))
    rows = [{"via": "direct", **row_of(direct_out, args), "mode": "chat"}, {"via": "sluicegate", **row_of(out, args)}]
    title = describe_llama_bench(ending, answer, args.max_tokens)
    shape = (f"{args.workers} worker{'s' if args.workers != 1 else ''} x "
             f"{args.slots} slot{'s' if args.slots != 1 else ''}")
    print(f"\n{args.max_tokens}-token requests end to end over {out['seconds']:.1f} s, {title}; Sluicegate {shape}")
    print_table(rows)
    print_both_cpu(direct_out, {args.mode: out})
    share = rate / direct_rate if direct_rate else float("nan")
    print(f"\n{rate:.1f} completed requests/s through Sluicegate, {direct_rate:.1f} directly: {100 * share:.0f}% of "
          f"the engine's own rate")
    result = {"rows": rows, "req_per_s": round(rate, 1), "direct_req_per_s": round(direct_rate, 1),
              "share_of_direct": round(share, 3), "engine_server": title,
              "server_cpu_seconds": out["server_cpu"], "direct_server_cpu_seconds": direct_out["server_cpu"],
              "errors": out["errors"][:20], "direct_errors": direct_out["errors"][:20],
              "steal_percent": {"direct": direct_out["steal_percent"], "sluicegate": out["steal_percent"]},
              "load_average": {"direct": direct_out["load_average"], "sluicegate": out["load_average"]},
              "settings": {**{k: v for k, v in vars(args).items() if k != "func"}, "serve_flags": flags,
                           "prompt": prompt, "max_tokens_asked": asked}}
    write_result("throughput-llamacpp", result)
    return result


def run_sim_backend(args: argparse.Namespace) -> dict[str, Any]:
    """Issue 15's setup: `sluicegate sim-backend` (a real OpenAI-compatible streaming server, 1,000 tokens/s)
    alone on the chat route, then Sluicegate (`--engine openai`) in front of it, in one run: on `--mode`'s
    route, or with `both` the chat and the resumable route in alternating phases (DESIGN's two rows)."""
    from sluicegate.loadtest.common import Component, free_port, wait_http

    port = free_port()
    backend = Component("sim-backend", ["--port", str(port), "--sim-prefill-ms", "0",
                                        "--sim-tokens-per-second", "1000"]).start()
    root = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{root}/v1/models", process=backend.process)

        async def direct(http: BenchHTTP, sid: str) -> int:
            return await one_chat(http, root, sid, args.max_tokens, model="sim")

        progress("the sim-backend alone (POST /v1/chat/completions, streamed)")
        direct_out = measure_on_loop(direct, [backend.pid], args.max_tokens, args)
        flags = ["--engine", "openai", "--backend-url", f"{root}/v1", "--backend-model", "sim",
                 "--workers", str(args.workers), "--slots", str(args.slots), *args.serve_flag]
        serve = ServeProcess(flags=flags).start()
        ones = routes(serve.base_url, args.max_tokens, model="sim")
        roots = [serve.process.pid, backend.pid]  # type: ignore[union-attr]
        try:
            wait_model(serve.base_url, "sim")
            if args.mode == "both":
                merged = alternate(ones, roots, args.max_tokens, args)
            else:
                progress(f"through Sluicegate ({args.mode} route)")
                out = measure_on_loop(ones[args.mode], roots, args.max_tokens, args)
                merged = {args.mode: {**out, "phases": [phase_of(args.mode, 1, out)]}}
        finally:
            serve.stop()
    finally:
        backend.stop()
    rates = {mode: o["completed"] / o["seconds"] for mode, o in merged.items()}
    direct_rate = direct_out["completed"] / direct_out["seconds"]
    rows = [{"via": "direct", **row_of(direct_out, argparse.Namespace(**{**vars(args), "mode": "chat"}))},
            *({"via": "sluicegate", **row_of(o, argparse.Namespace(**{**vars(args), "mode": mode}))}
              for mode, o in merged.items())]
    print(f"\n{args.max_tokens}-token requests end to end over {sum(o['seconds'] for o in merged.values()):.1f} s, "
          f"sim-backend at 1,000 tokens/s; Sluicegate {args.workers} workers x {args.slots} slots")
    print_table(rows)
    print_both_cpu(direct_out, merged)
    result: dict[str, Any] = {"rows": rows, "direct_req_per_s": round(direct_rate, 1)}
    phases = {mode: o["phases"] for mode, o in merged.items()}
    if "chat" in rates:
        line, verdict = target_line(rates["chat"], args, phases=phases["chat"])
        print(f"\n{rates['chat']:.0f} completed requests/s on the chat route through Sluicegate, "
              f"{direct_rate:.0f} directly: {line}")
        result.update({"req_per_s": round(rates["chat"], 1), **verdict})
    if "sse" in rates and "chat" not in rates:
        line, verdict = target_line(rates["sse"], args, "sse", phases=phases["sse"])
        print(f"\n{rates['sse']:.0f} completed requests/s on the resumable route through Sluicegate, "
              f"{direct_rate:.0f} directly: {line}")
        result.update({"req_per_s": round(rates["sse"], 1), **verdict})
    if len(rates) == 2:
        share = rates["sse"] / rates["chat"] if rates["chat"] else float("nan")
        line, share_verdict = share_line(share, args, phases=[p for ps in phases.values() for p in ps])
        print(f"resumable route (submit + GET events) {rates['sse']:.0f} req/s = {100 * share:.0f}% of the chat "
              f"route's {rates['chat']:.0f} req/s: {line}")
        result.update({"resumable_req_per_s": round(rates["sse"], 1),
                       **{("share_" + k if k in ("target_met", "setup_as_target", "verdict_reason") else k): v
                          for k, v in share_verdict.items()}})
    result.update({"phases": [asdict(p) for ps in phases.values() for p in ps],
                   "server_cpu_seconds": {m: o["server_cpu"] for m, o in merged.items()},
                   "direct_server_cpu_seconds": direct_out["server_cpu"],
                   "errors": {m: o["errors"][:20] for m, o in merged.items()},
                   "steal_percent": {"direct": direct_out["steal_percent"],
                                     **{m: o["steal_percent"] for m, o in merged.items()}},
                   "load_average": {"direct": direct_out["load_average"],
                                    **{m: o["load_average"] for m, o in merged.items()}},
                   "settings": {**{k: v for k, v in vars(args).items() if k != "func"}, "serve_flags": flags}})
    write_result("throughput-sim-backend" if args.mode == "chat" else f"throughput-sim-backend-{args.mode}", result)
    return result


def print_runs_cpu(runs: dict[str, dict[str, Any]]) -> None:
    """Server CPU by process role of each measured run (name -> what `measure` reports), its first errors
    and its host line."""
    for name, o in runs.items():
        print(f"\nserver CPU seconds in the window, {name}, by process role (cores = seconds / window):")
        print_cpu(o)
        if o["errors"]:
            print(f"first errors: {o['errors'][:3]}")
        print(run_host_line(o))


def print_both_cpu(direct_out: dict[str, Any], merged: dict[str, dict[str, Any]]) -> None:
    """The direct run's and each route's run through Sluicegate."""
    print_runs_cpu({"direct": direct_out, **{f"through Sluicegate, {m} route": o for m, o in merged.items()}})
