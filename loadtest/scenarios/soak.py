"""soak: N concurrent streams for D seconds with client drops, then a flooding tenant; memory, keys, gaps, TTFT.

Starts its own stack (like `fanout`): a Valkey server with AOF, one `sluicegate api` (the process whose
RSS is sampled), a scheduler and `--workers` sim workers with enough slots for every stream
(`--slots 0`: 1.1 x streams over the workers), all with a short `--session-ttl` (default 30 s) so that
the leak check after the run takes seconds, not an hour. `--valkey-nice -10` runs Valkey first to the
CPU, as on a host where it has a core of its own (see `prioritize`). Auth is off and each request names its
`tenant` (as the other scenarios do); the tenants get weights through PUT /v1/admin/tenants.

Each of `--streams` clients belongs to a well-behaved tenant (streams split by weight, default
t1:t2:t4 = 1:2:4) and loops: submit (same session with probability `--same-session`, else a new
one) -> follow GET /v1/requests/{id}/events to `done` -> think -> again. With probability
`--drop-rate` a connection is closed at a random event and reopened after a random pause with
Last-Event-ID (possibly more than once per request; one request's pauses add up to at most half the
session TTL, so that it never comes back to an expired request); every token index of every request
must arrive exactly once, in order (`gaps`, `doubles`).

Two phases in one run, `--duration` seconds in all (default 600, split by `--flood-fraction`, default
0.5: 300 s without the flooder, then 300 s with it). In the second phase the tenant `flood` (weight
`--flood-weight`, 1) submits as fast as `--flood-submitters` loops can, each request in a session of its
own, in the same group and class, and keeps about `--flood-backlog` requests queued (it stops
submitting while /v1/admin/stats shows that many: what a max_queued guardrail would enforce; an
unbounded backlog would make Valkey grow by design, which is no leak). It never reads its streams.

Measured:
- memory every `--sample-every` s: Valkey used_memory (INFO), DBSIZE, RSS of the API process (and
  of the scheduler and workers): start / end of load / max / after the TTL, and the slope of a linear
  fit over the second half of the run and of each phase (flat = a small slope);
- keys: after the load stops and the group is idle, wait the session TTL (+5 s) and SCAN: only
  fixed per-group, per-bucket and global keys may remain; any session or request key, any run,
  lease, ticket or ready-set entry, or any key mentioning a session or request id of the run is leaked;
- gaps and doubled token indices over all streams, resumed ones counted apart (must be 0);
- TTFT of the well-behaved tenants in both phases (client: POST sent -> first token event, left out
  only for a request the client itself dropped before its first token; server: first_token_at -
  submitted_at of a `--view-sample` fraction), leaving out `--warmup` s at each phase start; a request
  that got no first token (refused, abandoned, ended without one) is a miss, +inf, in its phase's p99;
  target p99 with the flooder <= 1.5 x p99 without (reported, MISS printed, never fails the run);
- requests and tokens completed per tenant and phase against the weight shares, and runs preempted per
  phase by reason (server counters).
Exit code 1 when gaps/doubles > 0, leaked keys > 0 or a well-behaved request failed (its submit refused,
abandoned after 5 failed connections, or ended other than `done`), after writing loadtest/results/soak.json.
Smoke: `sluicegate bench soak --streams 100 --duration 60`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
from redis.asyncio import Redis

from sluicegate.gc_tuning import settle_after_start_up
from sluicegate.loadtest.common import (
    Component,
    client_session,
    cpu_by_role,
    cpu_delta,
    cpu_seconds,
    cpu_ticks,
    free_port,
    percentile,
    print_table,
    progress,
    scratch_server,
    sse_events,
    steal_percent,
    wait_http,
    write_result,
)
from sluicegate.loadtest.scenarios.live import LABEL, METRIC_LINE, get_json, put
from sluicegate.loadtest.targets import verdict_word
from sluicegate.sessions import keys

FLOOD = "flood"
TTFT_RATIO_TARGET = 1.5
STALL_MS = 1  # Valkey's latency monitor logs what takes this long or more (milliseconds)
TERMINAL = ("done", "error", "cancelled")
# Control-plane keys that hold per-run or per-ready-session entries: an idle group has none of them
# (Redis deletes an emptied hash, set, zset or list), so any left after the run is a leaked entry.
TRANSIENT_GROUP_KEYS = re.compile(r"^(rq|ri|run|ro|rt:.+|pre|pin|leases|tk|cls|c\d+|c\d+:.+|age\d+|w:[^:]+:in)$")
ID_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", type=int, default=1000, help="concurrent well-behaved clients (one stream each)")
    p.add_argument("--duration", type=float, default=600.0,
                   help="seconds of load in all: the first phase without the flooder, the second with it")
    p.add_argument("--flood-fraction", type=float, default=0.5, help="share of --duration with the flooder")
    p.add_argument("--weights", default="t1=1,t2=2,t4=4", help="well-behaved tenants and weights (streams split so)")
    p.add_argument("--flood-weight", type=float, default=1.0, help="weight of the flooding tenant")
    p.add_argument("--flood-backlog", type=int, default=1000, help="requests the flooder keeps queued")
    p.add_argument("--flood-submitters", type=int, default=16, help="concurrent submit loops of the flooder")
    p.add_argument("--workers", type=int, default=4, help="sim worker processes")
    p.add_argument("--slots", type=int, default=0, help="slots per worker (0: 1.1 x streams over the workers)")
    p.add_argument("--tokens-per-second", type=float, default=1.0, help="sim pace per request")
    p.add_argument("--prefill-ms", type=float, default=20.0, help="sim delay before the first token")
    p.add_argument("--max-tokens", default="5,15", help="tokens per request: uniform in MIN,MAX")
    p.add_argument("--think", default="0.5,2.5", help="seconds between a request's end and the next: uniform MIN,MAX")
    p.add_argument("--same-session", type=float, default=0.5, help="chance the next request reuses the session")
    p.add_argument("--drop-rate", type=float, default=0.2, help="chance a connection is dropped at a random event")
    p.add_argument("--pause", default="0.2,3",
                   help="seconds before a dropped client resumes: uniform MIN,MAX (a request's pauses add up to "
                        "at most half --session-ttl)")
    p.add_argument("--session-ttl", type=int, default=30, help="--session-ttl of the stack (the leak check waits it)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds left out of TTFT at each phase start")
    p.add_argument("--view-sample", type=float, default=0.25,
                   help="share of well-behaved requests whose server timestamps are read after `done`")
    p.add_argument("--valkey-nice", type=int, default=0,
                   help="scheduling priority of the stack's Valkey (0: as every other process; -10: first to "
                        "the CPU, as with a core of its own; below 0 needs CAP_SYS_NICE, and without it the run "
                        "goes on at 0 and says so)")
    p.add_argument("--seed", type=int, default=12)


def pair(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    return low, high


def tenant_weights(text: str) -> dict[str, float]:
    return {name: float(w) for name, w in (item.split("=") for item in text.split(","))}


def split_streams(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Streams per tenant in proportion to weight (largest remainder), so demand matches the weight shares."""
    whole = sum(weights.values())
    exact = {t: total * w / whole for t, w in weights.items()}
    counts = {t: int(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: exact[t] - counts[t], reverse=True)[: total - sum(counts.values())]:
        counts[t] += 1
    return counts


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per second) of (t, value) points; 0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def raise_fd_limit() -> int:
    """1000 streams need >2000 sockets here (and the API, started from here, inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def prioritize(pid: int | None, nice: int) -> int:
    """Give Valkey the CPU first, as a deployment gives it a core of its own: on one 2-core host with
    the API, the workers and the load generator, the OS preempts it mid-command (an append, 75 us, ran
    up to 40 ms in Valkey's slow log), the more the busier the host, and every stream waits on it.
    Returns the nice value it runs at."""
    if pid is None or nice == 0:
        return 0
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)  # its main thread: the one that serves commands
    except PermissionError:
        progress(f"Valkey stays at nice 0: setting {nice} needs CAP_SYS_NICE (--valkey-nice 0 to silence this)")
        return 0
    return nice


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class StreamCheck:
    """The token indices one request delivered over all its connections: each once, in order.

    A lower index than expected is a double; a higher one skips (gaps) the ones in between; fewer
    than the request's tokens at `done` is a gap at the end. Event ids must rise across reconnects."""

    max_tokens: int
    expected: int = 0
    gaps: int = 0
    doubles: int = 0
    last_id: int | None = None
    id_regressions: int = 0

    def event_id(self, eid: int) -> None:
        if self.last_id is not None and eid <= self.last_id:
            self.id_regressions += 1
        self.last_id = eid

    def token(self, index: int) -> None:
        if index < self.expected:
            self.doubles += 1
        elif index > self.expected:
            self.gaps += index - self.expected
            self.expected = index + 1
        else:
            self.expected += 1

    def finish(self) -> None:
        if self.expected < self.max_tokens:
            self.gaps += self.max_tokens - self.expected
            self.expected = self.max_tokens


@dataclass
class PhaseTally:
    """What the well-behaved clients saw in one phase (by submit time)."""

    done: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # by kind: refused, abandoned, not_done
    no_first_token: int = 0  # TTFT samples that are misses (+inf), outside the warm-up
    tokens: dict[str, int] = field(default_factory=dict)
    ttft_client: list[float] = field(default_factory=list)
    ttft_server: list[float] = field(default_factory=list)
    wait_server: list[float] = field(default_factory=list)
    start_to_token_server: list[float] = field(default_factory=list)


@dataclass
class Tally:
    phases: list[PhaseTally] = field(default_factory=lambda: [PhaseTally(), PhaseTally()])
    requests: int = 0
    streams_dropped: int = 0  # connections the clients closed on purpose
    resumed_requests: int = 0
    resumed_clean: int = 0
    gaps: int = 0
    doubles: int = 0
    id_regressions: int = 0
    resumed_gaps: int = 0
    resumed_doubles: int = 0
    bad: list[str] = field(default_factory=list)
    ended_not_done: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unexpected_closes: int = 0
    rids: set[str] = field(default_factory=set)
    flood_submitted: int = 0
    flood_refused: list[str] = field(default_factory=list)
    tokens_received: int = 0
    open_streams: int = 0
    loop_lag: list[list[float]] = field(default_factory=lambda: [[], []])


@dataclass
class Clock:
    """Load time and the phase a moment belongs to."""

    started: float
    phase1: float  # seconds of the first phase

    def now(self) -> float:
        return time.monotonic() - self.started

    def phase(self, at: float | None = None) -> int:
        return 0 if (self.now() if at is None else at) < self.phase1 else 1


class Soak:
    def __init__(self, args: argparse.Namespace, base: str) -> None:
        self.args = args
        self.base = base
        self.weights = tenant_weights(args.weights)
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.flooding = asyncio.Event()
        self.rng = random.Random(args.seed)
        self.tokens_range = tuple(int(x) for x in pair(args.max_tokens))
        self.think = pair(args.think)
        self.pause = pair(args.pause)
        self.flood_backlog_seen = 0
        self.flood_since_poll = 0
        self.clock = Clock(time.monotonic(), args.duration * (1 - args.flood_fraction))

    # ---- well-behaved clients ---------------------------------------------------------------
    async def client(self, http: aiohttp.ClientSession, c: int, tenant: str, delay: float) -> None:
        rng = random.Random(self.rng.random())
        await asyncio.sleep(delay)
        sid, k = f"soak-{c}-0", 0
        while not self.stop.is_set():
            if k and rng.random() >= self.args.same_session:
                sid = f"soak-{c}-{k}"
            k += 1
            n = rng.randint(*self.tokens_range)
            body = {"prompt": f"soak {sid} {k}", "max_tokens": n, "tenant": tenant, "priority": 5}
            t0 = time.monotonic()
            at = t0 - self.clock.started
            try:
                async with http.post(f"{self.base}/v1/sessions/{sid}/requests", json=body) as response:
                    if response.status != 202:
                        raise RuntimeError(f"submit -> {response.status}: {(await response.text())[:200]}")
                    rid = str((await response.json())["request_id"])
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as error:
                self.tally.errors.append(f"submit {sid}: {type(error).__name__}: {error}")
                self.account(rng, at, None, failure="refused")
                await asyncio.sleep(1.0)
                continue
            self.tally.rids.add(rid)
            await self.follow(http, rng, rid, n, tenant, t0, at)
            await asyncio.sleep(rng.uniform(*self.think))

    async def follow(self, http: aiohttp.ClientSession, rng: random.Random, rid: str, n: int, tenant: str,
                     t0: float, at: float) -> None:
        """Stream the request to its end, dropping and resuming the connection at random; check the indices."""
        check = StreamCheck(n)
        url = f"{self.base}/v1/requests/{rid}/events"
        ended: str | None = None
        connections = failures = 0
        ttft: float | None = None  # to the first token, on whichever connection it came
        timed = True  # False once the client dropped a connection on purpose before the first token
        events_seen = 0
        # A client away longer than the session TTL finds its ended request expired, as designed, and the request
        # would count as failed: so one request's pauses add up to at most half the TTL (the smoke test's is 2 s).
        away = self.args.session_ttl / 2
        while ended is None:
            remaining = n + 3 - events_seen  # queued, started, tokens, done
            drop_at = rng.randint(0, max(0, remaining)) if rng.random() < self.args.drop_rate else None
            headers = {"Last-Event-ID": str(check.last_id)} if check.last_id is not None else {}
            connections += 1
            received = 0
            dropped = False
            try:
                self.tally.open_streams += 1
                async with http.get(url, headers=headers) as response:
                    if response.status != 200:
                        raise RuntimeError(f"events -> {response.status}: {(await response.text())[:200]}")
                    if drop_at == 0:
                        dropped = True
                        timed = timed and ttft is not None
                    else:
                        async for event in sse_events(response):
                            received += 1
                            events_seen += 1
                            if event.id is not None:
                                check.event_id(int(event.id))
                            if event.event == "token":
                                data = json.loads(event.data)
                                check.token(int(data["index"]))
                                self.tally.tokens_received += 1
                                if ttft is None:
                                    ttft = time.monotonic() - t0
                            elif event.event in TERMINAL:
                                ended = event.event
                                if ended != "done":
                                    self.tally.ended_not_done.append(f"{rid}: {ended} {event.data[:300]}")
                                break
                            if drop_at is not None and received >= drop_at:
                                dropped = True
                                timed = timed and ttft is not None
                                break
            except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as error:
                failures += 1
                self.tally.errors.append(f"{rid} (connection {connections}, {time.monotonic() - t0:.1f} s after "
                                         f"the submit was sent): {type(error).__name__}: {error}")
                if failures >= 5:
                    self.tally.abandoned.append(f"{rid}: gave up after {failures} failed connections")
                    self.account(rng, at, ttft, failure="abandoned", timed=timed)
                    return
                await asyncio.sleep(1.0)
                continue
            finally:
                self.tally.open_streams -= 1
            if ended is None:
                if dropped:
                    self.tally.streams_dropped += 1
                else:
                    self.tally.unexpected_closes += 1
                pause = min(rng.uniform(*self.pause), away) if dropped else 0.2
                away -= pause if dropped else 0.0
                await asyncio.sleep(pause)
        self.tally.requests += 1
        if ended == "done":
            check.finish()
        resumed = connections > 1
        self.tally.gaps += check.gaps
        self.tally.doubles += check.doubles
        self.tally.id_regressions += check.id_regressions
        if resumed:
            self.tally.resumed_requests += 1
            self.tally.resumed_gaps += check.gaps
            self.tally.resumed_doubles += check.doubles
            if not (check.gaps or check.doubles or check.id_regressions):
                self.tally.resumed_clean += 1
        if check.gaps or check.doubles or check.id_regressions:
            self.tally.bad.append(f"{rid}: gaps {check.gaps}, doubles {check.doubles}, id regressions "
                                  f"{check.id_regressions} over {connections} connections")
        tally = self.tally.phases[self.clock.phase(at)]
        if ended == "done":
            tally.done[tenant] = tally.done.get(tenant, 0) + 1
            tally.tokens[tenant] = tally.tokens.get(tenant, 0) + n
        sampled = self.account(rng, at, ttft, failure=None if ended == "done" else "not_done", timed=timed)
        if ended == "done" and ttft is not None and sampled:
            with contextlib.suppress(aiohttp.ClientError, RuntimeError, TimeoutError, KeyError, TypeError):
                view = await get_json(http, self.base, f"/v1/requests/{rid}")
                tally.ttft_server.append(view["first_token_at"] - view["submitted_at"])
                tally.wait_server.append(view["started_at"] - view["submitted_at"])
                tally.start_to_token_server.append(view["first_token_at"] - view["started_at"])

    def account(self, rng: random.Random, at: float, ttft: float | None, *, failure: str | None,
                timed: bool = True) -> bool:
        """Count one well-behaved request, submitted at `at`, in its phase: a failure by kind, and its client
        TTFT. One with no first token is a miss (+inf; in the server's sample too, at its rate), never left
        out: a stack that fails requests must not read faster. Returns whether the server's TTFT of a
        request that got its first token is to be sampled (outside the warm-up, at `--view-sample`)."""
        tally = self.tally.phases[self.clock.phase(at)]
        if failure:
            tally.failed[failure] = tally.failed.get(failure, 0) + 1
        if self.in_warmup(at):
            return False
        if ttft is None:
            tally.no_first_token += 1
            tally.ttft_client.append(math.inf)
        elif timed:  # dropped on purpose before its first token: the client cannot time it
            tally.ttft_client.append(ttft)
        sampled = rng.random() < self.args.view_sample
        if sampled and ttft is None:
            tally.ttft_server.append(math.inf)
        return sampled

    def in_warmup(self, at: float) -> bool:
        return at - (0 if self.clock.phase(at) == 0 else self.clock.phase1) < self.warmup

    @property
    def warmup(self) -> float:
        return min(self.args.warmup, self.clock.phase1 / 3, (self.args.duration - self.clock.phase1) / 3)

    # ---- the flooder -------------------------------------------------------------------------
    async def flood_poll(self, http: aiohttp.ClientSession) -> None:
        """The flooder's own backlog, from /v1/admin/stats once a second (its stand-in for a 429)."""
        while not self.stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, RuntimeError, TimeoutError):
                before = self.flood_since_poll
                stats = await get_json(http, self.base, "/v1/admin/stats")
                self.flood_backlog_seen = sum(r["queued"] for r in stats["queue_depth"] if r["tenant"] == FLOOD)
                self.flood_since_poll -= before
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)

    async def flood_submitter(self, http: aiohttp.ClientSession, s: int) -> None:
        rng = random.Random(self.rng.random())
        n = 0
        while not self.stop.is_set():
            if self.flood_backlog_seen + self.flood_since_poll >= self.args.flood_backlog:
                await asyncio.sleep(0.05)
                continue
            sid = f"flood-{s}-{n}"
            n += 1
            body = {"prompt": f"flood {sid}", "max_tokens": rng.randint(*self.tokens_range), "tenant": FLOOD,
                    "priority": 5}
            try:
                async with http.post(f"{self.base}/v1/sessions/{sid}/requests", json=body) as response:
                    if response.status != 202:
                        raise RuntimeError(f"submit -> {response.status}: {(await response.text())[:200]}")
                    self.tally.rids.add(str((await response.json())["request_id"]))
                self.tally.flood_submitted += 1
                self.flood_since_poll += 1
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as error:
                self.tally.flood_refused.append(f"{type(error).__name__}: {error}")
                await asyncio.sleep(0.1)

    # ---- sampling ----------------------------------------------------------------------------
    async def loop_lag(self) -> None:
        """How late this process's own event loop wakes (a busy client inflates its TTFT figures)."""
        while not self.stop.is_set():
            began = time.monotonic()
            await asyncio.sleep(0.25)
            self.tally.loop_lag[self.clock.phase()].append(time.monotonic() - began - 0.25)


async def metric_totals(http: aiohttp.ClientSession, base: str, name: str,
                        want: dict[str, str] | None = None, by: str = "tenant") -> dict[str, float]:
    """A Prometheus counter from /metrics summed by one label, keeping only series with `want` labels."""
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if not match or match.group(1) != name:
            continue
        labels = dict(LABEL.findall(match.group(2)))
        if want and any(labels.get(k) != v for k, v in want.items()):
            continue
        totals[labels.get(by, "")] = totals.get(labels.get(by, ""), 0.0) + float(match.group(3))
    return totals


async def valkey_stalls(client: Redis) -> dict[str, dict[str, float]]:
    """What Valkey's latency monitor logged since the last call (which resets it), by event: `command`
    (a command that ran >= 1 ms: a long script, or the server preempted mid-command), `aof-write`, `fork`..."""
    logged: dict[str, dict[str, float]] = {}
    for entry in await client.execute_command("LATENCY", "LATEST"):
        name = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
        logged[name] = {"max_ms": int(entry[3])}
        if len(entry) >= 6:  # Valkey 8.1: the sum and the count of the spikes too
            logged[name] |= {"sum_ms": int(entry[4]), "count": int(entry[5])}
    await client.execute_command("LATENCY", "RESET")
    return logged


async def counters(http: aiohttp.ClientSession, base: str) -> dict[str, dict[str, float]]:
    return {"done": await metric_totals(http, base, "sluicegate_requests_total", {"status": "done"}),
            "tokens": await metric_totals(http, base, "sluicegate_tokens_total"),
            "preempted": await metric_totals(http, base, "sluicegate_preemptions_total", by="reason")}


def preemptions(marks: list[dict[str, dict[str, float]]]) -> list[dict[str, int]]:
    """Runs preempted in each phase, by reason (fair_share: a tenant below its share took the slot; the
    headroom, --fair-share-headroom, is there to make these rare)."""
    return [{reason: int(marks[p + 1]["preempted"].get(reason, 0) - marks[p]["preempted"].get(reason, 0))
             for reason in sorted(set(marks[p + 1]["preempted"]) | set(marks[p]["preempted"]))} for p in range(2)]


async def sample_memory(client: Redis, pids: dict[str, list[int]], soak: Soak, samples: list[dict[str, Any]],
                        until: asyncio.Event) -> None:
    """Every --sample-every s until `until`: Valkey used_memory and DBSIZE, RSS by role, streams open."""
    every = soak.args.sample_every
    next_at = time.monotonic()
    while True:
        info = await client.info("memory")
        row: dict[str, Any] = {"t": round(soak.clock.now(), 1), "used_memory": int(info["used_memory"]),
                               "dbsize": int(await client.dbsize())}
        for role, role_pids in pids.items():
            row[f"{role}_rss"] = sum(rss_bytes(pid) for pid in role_pids)
        row["open_streams"] = soak.tally.open_streams
        row["tokens_received"] = soak.tally.tokens_received
        samples.append(row)
        if until.is_set():
            return
        next_at += every
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), max(0.0, next_at - time.monotonic()))


def memory_summary(samples: list[dict[str, Any]], metric: str, load_end: float, phase1: float) -> dict[str, Any]:
    """Start / end of load / max / last for one sampled series, and least-squares slopes (bytes/min)."""
    during = [s for s in samples if s["t"] <= load_end + 0.5]
    points = [(s["t"], float(s[metric])) for s in during]

    def fit(lo: float, hi: float) -> float:
        return round(60 * slope([(t, v) for t, v in points if lo <= t <= hi]), 1)

    values = [v for _, v in points]
    return {"metric": metric, "start": int(values[0]), "end_of_load": int(values[-1]), "max": int(max(values)),
            "after_ttl": int(samples[-1][metric]),
            "slope_second_half_per_min": fit(load_end / 2, load_end),
            "slope_phase1_second_half_per_min": fit(phase1 / 2, phase1),
            "slope_phase2_second_half_per_min": fit(phase1 + (load_end - phase1) / 2, load_end)}


def classify(name: str) -> str:
    """fixed | leaked-data (a session's or request's key) | leaked-control (a run or ready entry)."""
    if name.startswith("rq:") or not name.startswith(keys.PREFIX + "{"):
        return "fixed"  # global keys and the workers' rq presence
    tag, _, suffix = name[len(keys.PREFIX) + 1:].partition("}:")
    if tag.startswith("s:"):
        if suffix == "ob":  # an outbox entry is a transition left half done
            return "leaked-control"
        # A session's or request's own keys; per-bucket ones (metrics m, usage u) are fixed and bounded.
        return "leaked-data" if suffix.startswith(("r:", "s:", "e:")) else "fixed"
    if tag.startswith("g:"):
        return "leaked-control" if TRANSIENT_GROUP_KEYS.match(suffix) else "fixed"
    return "fixed"


def key_contents(client: redis.Redis, name: str) -> list[str]:
    kind = client.type(name).decode()
    raw: list[Any]
    if kind == "string":
        raw = [client.get(name) or b""]
    elif kind == "hash":
        raw = [x for pair_ in client.hgetall(name).items() for x in pair_]
    elif kind == "list":
        raw = client.lrange(name, 0, -1)
    elif kind == "set":
        raw = list(client.smembers(name))
    elif kind == "zset":
        raw = client.zrange(name, 0, -1)
    else:
        raw = []
    return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in raw]


def leak_check(client: redis.Redis, rids: set[str]) -> dict[str, Any]:
    """Every key left, classified; plus any remaining key whose name or content names a run's session or request."""
    remaining = sorted(k.decode() for k in client.scan_iter(count=10_000))
    kinds: dict[str, list[str]] = {"fixed": [], "leaked-data": [], "leaked-control": []}
    for name in remaining:
        kinds[classify(name)].append(name)
    mentions = []
    for name in kinds["fixed"]:
        texts = [name, *key_contents(client, name)]
        if any("soak-" in t or "flood-" in t or any(tok in rids for tok in ID_TOKEN.findall(t)) for t in texts):
            mentions.append(name)
    leaked = kinds["leaked-data"] + kinds["leaked-control"] + mentions
    details = [{"key": k, "type": client.type(k).decode(), "ttl": client.ttl(k)} for k in leaked[:50]]
    templates: dict[str, int] = {}
    for name in kinds["fixed"]:
        shape = re.sub(r"\{s:[0-9a-v]{2}\}", "{s:BB}", name)
        shape = re.sub(r":w:[^:]+", ":w:<wid>", shape)
        shape = re.sub(r"^rq:worker:.*", "rq:worker:<wid>", shape)
        templates[shape] = templates.get(shape, 0) + 1
    return {"keys_left": len(remaining), "fixed": len(kinds["fixed"]), "fixed_shapes": templates,
            "leaked_data_keys": len(kinds["leaked-data"]), "leaked_control_keys": len(kinds["leaked-control"]),
            "keys_mentioning_run_ids": len(mentions), "leaked": len(leaked), "leaked_examples": details}


def session_keys(client: redis.Redis) -> tuple[int, int]:
    """(data-plane session/request keys, how many of them have no TTL)."""
    names = [k for k in client.scan_iter(match=keys.PREFIX + "{s:*", count=10_000) if classify(k.decode()) != "fixed"]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.ttl(name)
    no_ttl = sum(1 for ttl in pipe.execute() if ttl == -1)
    return len(names), no_ttl


async def wait_idle(http: aiohttp.ClientSession, base: str, timeout: float = 300) -> float:
    """Seconds until the group runs and queues nothing (the flooder's backlog drains first)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        with contextlib.suppress(aiohttp.ClientError, RuntimeError, TimeoutError):
            stats = await get_json(http, base, "/v1/admin/stats")
            if stats["queued"] == 0 and stats["running"] == 0:
                return time.monotonic() - began
        await asyncio.sleep(1.0)
    raise TimeoutError(f"the stack still had work {timeout:g} s after the load stopped")


async def drive(args: argparse.Namespace, base: str, server_url: str, parts: dict[str, list[Component]],
                roots: list[int], valkey_pid: int | None) -> dict[str, Any]:
    soak = Soak(args, base)
    weights = soak.weights
    streams = split_streams(args.streams, weights)
    sync_client = redis.Redis.from_url(server_url)
    async_client = Redis.from_url(server_url)
    pids = {role: [c.pid for c in comps] for role, comps in parts.items()}
    if valkey_pid:
        pids["valkey"] = [valkey_pid]
    samples: list[dict[str, Any]] = []
    sampled = asyncio.Event()
    async with client_session(2 * args.streams + args.flood_submitters + 64) as http:
        for tenant, weight in {**weights, FLOOD: args.flood_weight}.items():
            await put(http, base, f"/v1/admin/tenants/{tenant}", {"weight": weight})
        soak.clock = Clock(time.monotonic(), args.duration * (1 - args.flood_fraction))
        ramp = min(10.0, soak.clock.phase1 / 4)
        progress(f"{args.streams} streams ({', '.join(f'{t} {n}' for t, n in streams.items())}), "
                 f"phase 1 {soak.clock.phase1:.0f} s without the flooder, phase 2 "
                 f"{args.duration - soak.clock.phase1:.0f} s with it; ramp {ramp:.0f} s")
        sampler = asyncio.create_task(sample_memory(async_client, pids, soak, samples, sampled))
        lag = asyncio.create_task(soak.loop_lag())
        marks = [await counters(http, base)]
        cpu_marks = [{**cpu_by_role(roots), "client (this process)": cpu_seconds()}]
        tick_marks = [cpu_ticks()]
        tasks: list[asyncio.Task[None]] = []
        c = 0
        for tenant, count in streams.items():
            for _ in range(count):
                tasks.append(asyncio.create_task(soak.client(http, c, tenant, ramp * c / args.streams)))
                c += 1

        async def report_until(end: float) -> None:
            while soak.clock.now() < end:
                await asyncio.sleep(min(30.0, max(0.0, end - soak.clock.now())))
                t = soak.tally
                last = samples[-1] if samples else {"used_memory": 0, "api_rss": 0}
                progress(f"  {soak.clock.now():.0f}/{args.duration:g} s: {t.requests} requests, open streams "
                         f"{t.open_streams}, drops {t.streams_dropped}, gaps {t.gaps}, doubles {t.doubles}, "
                         f"errors {len(t.errors)}, flood submitted {t.flood_submitted} (queued ~"
                         f"{soak.flood_backlog_seen}), used_memory {last['used_memory'] / 2**20:.1f} MiB, "
                         f"API RSS {last['api_rss'] / 2**20:.1f} MiB")

        # This process's own collector, tuned as the servers' (sluicegate/gc_tuning.py) once every client
        # is connected: untuned, its full collections (100-190 ms late in a run, over the live tasks and
        # connections) stalled the clients' loop and landed in the TTFT measured, later phases more.
        await asyncio.sleep(ramp + 1.0)
        settle_after_start_up()
        await async_client.config_set("latency-monitor-threshold", STALL_MS)
        await valkey_stalls(async_client)
        await report_until(soak.clock.phase1)
        stalls = [await valkey_stalls(async_client)]
        marks.append(await counters(http, base))
        cpu_marks.append({**cpu_by_role(roots), "client (this process)": cpu_seconds()})
        tick_marks.append(cpu_ticks())
        progress("phase 2: the flooder starts")
        flood = [asyncio.create_task(soak.flood_poll(http))] + [
            asyncio.create_task(soak.flood_submitter(http, s)) for s in range(args.flood_submitters)]
        await report_until(args.duration)
        load_end = soak.clock.now()
        soak.stop.set()
        for task in tasks + flood:
            task.cancel()
        await asyncio.gather(*tasks, *flood, lag, return_exceptions=True)
        stalls.append(await valkey_stalls(async_client))
        marks.append(await counters(http, base))
        cpu_marks.append({**cpu_by_role(roots), "client (this process)": cpu_seconds()})
        tick_marks.append(cpu_ticks())
        progress("load stopped; waiting for the group to drain")
        drained = await wait_idle(http, base)
        at_idle, no_ttl = session_keys(sync_client)
        progress(f"idle after {drained:.1f} s: {at_idle} session/request keys ({no_ttl} without a TTL); waiting "
                 f"the session TTL ({args.session_ttl} s) + 5 s")
        await asyncio.sleep(args.session_ttl + 5)
        expire_wait = 0.0
        while session_keys(sync_client)[0] and expire_wait < 30:  # the server's expiry cycle, a few seconds
            await asyncio.sleep(2.0)
            expire_wait += 2.0
        sampled.set()
        await sampler
        leaks = leak_check(sync_client, soak.tally.rids)
        idle_tickets = int(sync_client.llen(keys.group_key("default", "idle")))
    await async_client.aclose()
    sync_client.close()
    return {"soak": soak, "streams": streams, "samples": samples, "marks": marks, "cpu_marks": cpu_marks,
            "tick_marks": tick_marks, "load_end": load_end, "drained_s": drained, "keys_at_idle": at_idle,
            "keys_at_idle_without_ttl": no_ttl, "expire_wait_s": expire_wait, "leaks": leaks,
            "idle_tickets": idle_tickets, "valkey_stalls": stalls}


def ttft_row(phase: str, tally: PhaseTally) -> dict[str, Any]:
    ms_c = [x * 1000 for x in tally.ttft_client]
    ms_s = [x * 1000 for x in tally.ttft_server]
    return {"phase": phase, "requests": len(ms_c), "no_first_token": tally.no_first_token,
            "failed": sum(tally.failed.values()), "client_p50_ms": percentile(ms_c, 50),
            "client_p99_ms": percentile(ms_c, 99), "server_sampled": len(ms_s),
            "server_p50_ms": percentile(ms_s, 50), "server_p99_ms": percentile(ms_s, 99),
            "server_wait_p50_ms": percentile([x * 1000 for x in tally.wait_server], 50),
            "server_wait_p99_ms": percentile([x * 1000 for x in tally.wait_server], 99),
            "server_start_to_token_p99_ms": percentile([x * 1000 for x in tally.start_to_token_server], 99)}


def p99_ratio(without: float, with_flooder: float) -> tuple[float, bool]:
    """(p99 with the flooder / without, the target met): a phase whose p99 is a miss (+inf: a request with no
    first token) or missing (NaN) cannot meet it, whatever the ratio reads."""
    ratio = with_flooder / without if without else math.nan
    return ratio, math.isfinite(without) and math.isfinite(with_flooder) and ratio <= TTFT_RATIO_TARGET


def phase_failures(phases: list[PhaseTally]) -> list[str]:
    """Each phase's failed well-behaved requests, by kind, as failures of the run."""
    return [f"phase {p + 1}: {sum(tally.failed.values())} well-behaved requests failed ("
            + ", ".join(f"{kind} {n}" for kind, n in sorted(tally.failed.items())) + ")"
            for p, tally in enumerate(phases) if tally.failed]


def tenant_rows(out: dict[str, Any], weights: dict[str, float], flood_weight: float) -> list[dict[str, Any]]:
    marks = out["marks"]
    all_weights = {**weights, FLOOD: flood_weight}
    rows = []
    for p, name in enumerate(("1 (no flooder)", "2 (flooder)")):
        done = {t: marks[p + 1]["done"].get(t, 0) - marks[p]["done"].get(t, 0) for t in all_weights}
        tokens = {t: marks[p + 1]["tokens"].get(t, 0) - marks[p]["tokens"].get(t, 0) for t in all_weights}
        active = {t: w for t, w in all_weights.items() if p == 1 or t != FLOOD}
        total_w, total_tokens = sum(active.values()), sum(tokens.values()) or 1
        for t, w in all_weights.items():
            rows.append({"phase": name, "tenant": t, "weight": w,
                         "weight_share": round(w / total_w, 4) if t in active else 0.0,
                         "streams": out["streams"].get(t, "-"),
                         "requests_done": int(done[t]), "tokens": int(tokens[t]),
                         "token_share": round(tokens[t] / total_tokens, 4)})
    return rows


def report(args: argparse.Namespace, out: dict[str, Any], slots: int) -> dict[str, Any]:
    soak: Soak = out["soak"]
    tally = soak.tally
    phase1 = soak.clock.phase1
    samples = out["samples"]
    series = ("used_memory", "dbsize", "api_rss", "scheduler_rss", "worker_rss", "valkey_rss")
    mem = [memory_summary(samples, m, out["load_end"], phase1) for m in series if m in samples[0]]
    ttft = [ttft_row("1 (no flooder)", tally.phases[0]), ttft_row("2 (flooder)", tally.phases[1])]
    ratio_client, met_client = p99_ratio(ttft[0]["client_p99_ms"], ttft[1]["client_p99_ms"])
    ratio_server, met_server = p99_ratio(ttft[0]["server_p99_ms"], ttft[1]["server_p99_ms"])
    tenants = tenant_rows(out, soak.weights, args.flood_weight)
    cpu = [cpu_delta(out["cpu_marks"][i], out["cpu_marks"][i + 1]) for i in range(2)]
    spans = [phase1, out["load_end"] - phase1]
    steal = [steal_percent(out["tick_marks"][i], out["tick_marks"][i + 1]) for i in range(2)]
    lag = [{"p99_ms": round(percentile(x, 99) * 1000, 1), "max_ms": round(max(x, default=0) * 1000, 1)}
           for x in tally.loop_lag]
    leaks = out["leaks"]
    streams = {"requests": tally.requests, "connections_dropped": tally.streams_dropped,
               "resumed_requests": tally.resumed_requests, "resumed_clean": tally.resumed_clean,
               "gaps": tally.gaps, "doubles": tally.doubles, "id_regressions": tally.id_regressions,
               "resumed_gaps": tally.resumed_gaps, "resumed_doubles": tally.resumed_doubles,
               "unexpected_closes": tally.unexpected_closes, "ended_not_done": len(tally.ended_not_done),
               "abandoned": len(tally.abandoned), "errors": len(tally.errors),
               "flood_submitted": tally.flood_submitted, "flood_refused": len(tally.flood_refused)}

    print(f"\nsoak: {args.streams} streams, {out['load_end']:.0f} s ({phase1:.0f} s without the flooder, "
          f"{out['load_end'] - phase1:.0f} s with it), {args.workers} workers x {slots} slots, sim "
          f"{args.tokens_per_second:g} tokens/s, {args.max_tokens} tokens, think {args.think} s, drop rate "
          f"{args.drop_rate:g}, session TTL {args.session_ttl} s, Valkey at nice {args.valkey_nice}")
    print("\nmemory (bytes; dbsize in keys; slopes per minute over the second half of the run / of each phase):")
    print_table(mem)
    print("\nstreams:")
    print_table([streams])
    print("\nTTFT of the well-behaved tenants (ms; client: POST sent -> first token event; server: first_token_at -"
          f" submitted_at, sampled; first {soak.warmup:.0f} s of each phase left out; no first token: +inf):")
    print_table(ttft)
    print(f"p99 with the flooder / without: client {ratio_client:.2f}x ({verdict_word(met_client)}), server "
          f"{ratio_server:.2f}x ({verdict_word(met_server)}); target <= {TTFT_RATIO_TARGET}x")
    print("\nper tenant and phase (server counters: requests done and output tokens):")
    print_table(tenants)
    preempted = preemptions(out["marks"])
    print("preempted runs by reason, phase 1 / phase 2: " + " / ".join(
        ", ".join(f"{reason} {n}" for reason, n in phase.items()) or "none" for phase in preempted))
    print("\nCPU seconds by role (cores = seconds / phase length):")
    print_table([{"role": r, "phase1_s": cpu[0].get(r, 0.0), "phase1_cores": cpu[0].get(r, 0.0) / spans[0],
                  "phase2_s": cpu[1].get(r, 0.0), "phase2_cores": cpu[1].get(r, 0.0) / max(spans[1], 1e-9)}
                 for r in sorted(set(cpu[0]) | set(cpu[1])) if cpu[0].get(r, 0.0) or cpu[1].get(r, 0.0)])
    print(f"steal {steal[0]}% / {steal[1]}%; client loop lag p99 {lag[0]['p99_ms']} / {lag[1]['p99_ms']} ms "
          f"(max {lag[0]['max_ms']} / {lag[1]['max_ms']} ms)")
    for i, logged in enumerate(out["valkey_stalls"]):
        print(f"Valkey's stalls >= {STALL_MS} ms, phase {i + 1} (latency monitor: count, max): " + (", ".join(
            f"{name} {e.get('count', '?')}, {e['max_ms']} ms" for name, e in sorted(logged.items())) or "none"))
    print(f"\nkeys: drained in {out['drained_s']:.1f} s; {out['keys_at_idle']} session/request keys at idle "
          f"({out['keys_at_idle_without_ttl']} without a TTL); after the TTL + {5 + out['expire_wait_s']:.0f} s: "
          f"{leaks['keys_left']} keys left, {leaks['fixed']} fixed, leaked {leaks['leaked']} (session/request "
          f"{leaks['leaked_data_keys']}, run/ready entries {leaks['leaked_control_keys']}, mentioning the run's ids "
          f"{leaks['keys_mentioning_run_ids']}); idle tickets {out['idle_tickets']} of {args.workers * slots}")
    shapes = sorted(leaks["fixed_shapes"].items())
    print("fixed keys left: " + ", ".join(f"{k} x{n}" if n > 1 else k for k, n in shapes))
    for example in leaks["leaked_examples"][:10]:
        print(f"LEAKED: {example}")
    for line in tally.bad[:5] + tally.ended_not_done[:5] + tally.abandoned[:5] + tally.errors[:5]:
        print(f"problem: {line}")
    failures = []
    if tally.gaps or tally.doubles or tally.id_regressions:
        failures.append(f"{tally.gaps} gaps, {tally.doubles} doubles, {tally.id_regressions} id regressions")
    if leaks["leaked"]:
        failures.append(f"{leaks['leaked']} keys leaked")
    failures += phase_failures(tally.phases)
    result = {
        "settings": {**vars(args), "slots": slots, "phase1_s": phase1, "load_s": round(out["load_end"], 1),
                     "streams_by_tenant": out["streams"]},
        "memory": mem, "streams": streams, "ttft": ttft,
        "ttft_p99_ratio": {"client": round(ratio_client, 3), "server": round(ratio_server, 3),
                           "target": TTFT_RATIO_TARGET, "client_met": met_client, "server_met": met_server},
        "tenants": tenants, "preempted": {"phase1": preempted[0], "phase2": preempted[1]},
        "cpu_seconds": {"phase1": cpu[0], "phase2": cpu[1]}, "steal_percent": steal,
        "client_loop_lag": lag, "valkey_stalls": {"phase1": out["valkey_stalls"][0], "phase2": out["valkey_stalls"][1]},
        "keys": {**leaks, "drained_s": round(out["drained_s"], 1), "session_keys_at_idle": out["keys_at_idle"],
                 "session_keys_at_idle_without_ttl": out["keys_at_idle_without_ttl"],
                 "expire_wait_s": out["expire_wait_s"], "idle_tickets": out["idle_tickets"],
                 "slots": args.workers * slots},
        "failures": failures,
        "problems": {"bad_streams": tally.bad[:20], "ended_not_done": tally.ended_not_done[:20],
                     "abandoned": tally.abandoned[:20], "errors": tally.errors[:20],
                     "flood_refused": tally.flood_refused[:20]},
        "samples": samples,
    }
    write_result("soak", result)
    for failure in failures:
        print(f"FAILED: {failure}")
    if failures:
        raise SystemExit(1)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    limit = raise_fd_limit()
    if limit < 2 * args.streams + args.flood_submitters + 256:
        progress(f"open files limited to {limit}: {args.streams} streams may run out of sockets")
    server = scratch_server(persistent=True)
    slots = args.slots or -(-int(args.streams * 1.1) // args.workers)
    port = free_port()
    common = ["--redis-url", server.url, "--session-ttl", str(args.session_ttl)]
    api = Component("api", [*common, "--port", str(port)])
    scheduler = Component("scheduler", common)
    workers = [Component("worker", [*common, "--slots", str(slots), "--sim-prefill-ms", str(args.prefill_ms),
                                    "--sim-tokens-per-second", str(args.tokens_per_second)])
               for _ in range(args.workers)]
    parts = {"api": [api], "scheduler": [scheduler], "worker": workers}
    try:
        for part in [api, scheduler, *workers]:
            part.start()
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process=api.process)
        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 60
        while int(client.llen(keys.group_key("default", "idle"))) < args.workers * slots:  # every slot's ticket
            if time.monotonic() > deadline:
                logs = [w.log_path.read_text()[-600:] for w in workers if w.log_path and w.log_path.is_file()]
                raise TimeoutError(f"{client.llen(keys.group_key('default', 'idle'))} of {args.workers * slots} "
                                   f"slot tickets after 60 s; worker logs: {logs}")
            time.sleep(0.2)
        client.close()
        valkey_pid = server.process.pid if server.process else None
        args.valkey_nice = prioritize(valkey_pid, args.valkey_nice)
        roots = [p.pid for p in [api, scheduler, *workers]] + ([valkey_pid] if valkey_pid else [])
        collector, frozen = gc.get_threshold(), gc.get_freeze_count()
        try:
            out = asyncio.run(drive(args, base, server.url, parts, roots, valkey_pid))
        finally:  # drive tunes this process's collector (settle_after_start_up): a caller's is its own
            if not frozen:
                gc.unfreeze()
            gc.set_threshold(*collector)
    finally:
        for part in [api, scheduler, *workers]:
            part.stop()
        server.stop()
    return report(args, out, slots)
