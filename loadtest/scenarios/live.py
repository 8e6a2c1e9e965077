"""Helpers for the scheduler scenarios that drive a live `sluicegate serve` through its public API:
submit, open-loop (Poisson) arrivals, tuning calls, and reading results back (request views and
the Prometheus token counters), so the figures use the server's own clock and counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sluicegate.loadtest.common import progress

METRIC_LINE = re.compile(r'^(\w+)\{([^}]*)\} ([0-9.eE+-]+)$')
LABEL = re.compile(r'(\w+)="([^"]*)"')


MIN_RUN_SECONDS = 0.001  # the shortest run capacity() assumes (about a dispatch's and a finish's round trips)


def capacity(slots: int, max_tokens: int, tokens_per_second: float, prefill_ms: float) -> float:
    """Requests per second a group can complete: slots over the length of one run. The sim engine
    (workers/engines/sim.py `paced_tokens`) sends the first token after the prefill and then one every
    1/tokens_per_second, so a run of n tokens lasts prefill + (n - 1) / tokens_per_second. A run the engine
    ends at once (1 token, no prefill) is taken as MIN_RUN_SECONDS: a dispatch and a finish are not free."""
    interval = 1 / tokens_per_second if tokens_per_second > 0 else 0.0
    return slots / max(MIN_RUN_SECONDS, prefill_ms / 1000 + max(0, max_tokens - 1) * interval)


def serve_flags(workers: int, slots: int, tokens_per_second: float, prefill_ms: float, *extra: str) -> list[str]:
    return ["--workers", str(workers), "--slots", str(slots), "--sim-tokens-per-second", str(tokens_per_second),
            "--sim-prefill-ms", str(prefill_ms), *extra]


async def submit(http: aiohttp.ClientSession, base: str, sid: str, body: dict[str, Any]) -> str:
    async with http.post(f"{base}/v1/sessions/{sid}/requests", json=body) as response:
        if response.status != 202:
            raise RuntimeError(f"submit -> {response.status}: {await response.text()}")
        return str((await response.json())["request_id"])


async def put(http: aiohttp.ClientSession, base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.put(f"{base}{path}", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"PUT {path} -> {response.status}: {await response.text()}")
        return dict(await response.json())


async def get_json(http: aiohttp.ClientSession, base: str, path: str) -> dict[str, Any]:
    async with http.get(f"{base}{path}") as response:
        if response.status != 200:
            raise RuntimeError(f"GET {path} -> {response.status}: {await response.text()}")
        return dict(await response.json())


async def fetch_views(http: aiohttp.ClientSession, base: str, rids: list[str],
                      concurrency: int = 16) -> dict[str, dict[str, Any]]:
    """GET /v1/requests/{rid} for each request (status, submitted_at, started_at, first_token_at ...)."""
    views: dict[str, dict[str, Any]] = {}
    queue = list(rids)

    async def worker() -> None:
        while queue:
            rid = queue.pop()
            views[rid] = await get_json(http, base, f"/v1/requests/{rid}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return views


async def token_counters(http: aiohttp.ClientSession, base: str, by: str = "tenant",
                         group: str | None = None) -> dict[str, float]:
    """sluicegate_tokens_total from /metrics, summed by one label (optionally for one group)."""
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if not match or match.group(1) != "sluicegate_tokens_total":
            continue
        labels = dict(LABEL.findall(match.group(2)))
        if group is not None and labels.get("group") != group:
            continue
        key = labels.get(by, "")
        totals[key] = totals.get(key, 0.0) + float(match.group(3))
    return totals


@dataclass
class Submitted:
    rid: str
    at: float  # seconds since the load started (client clock)
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class OpenLoop:
    """Poisson arrivals at `rate` per second for `seconds`, each request in a session of its own.

    `make` returns (body, tags) for the n-th arrival; submissions run concurrently (bounded), so a
    slow reply never delays the next arrival. Failed submits are kept in `errors` (more than 1%
    fails the run).
    """

    http: aiohttp.ClientSession
    base: str
    rate: float
    seconds: float
    make: Callable[[int], tuple[dict[str, Any], dict[str, Any]]]
    rng: random.Random
    prefix: str = "ol"
    in_flight: int = 256
    note_progress: bool = True
    submitted: list[Submitted] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def run(self, started: float | None = None) -> list[Submitted]:
        started = time.monotonic() if started is None else started
        gate = asyncio.Semaphore(self.in_flight)
        tasks: set[asyncio.Task[None]] = set()
        at, n, last_note = 0.0, 0, 0.0
        while True:
            at += self.rng.expovariate(self.rate)
            if at >= self.seconds:
                break
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            body, tags = self.make(n)
            task = asyncio.create_task(self._one(f"{self.prefix}-{n}", body, tags, started, gate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            if self.note_progress and at - last_note >= 10:
                last_note = at
                progress(f"  {at:.0f}/{self.seconds:.0f} s, {n} submitted")
        await asyncio.gather(*tasks)
        if self.errors:  # reported, not fatal: a figure under overload should say how many were refused
            progress(f"  {len(self.errors)} of {n} submits failed, first: {self.errors[0]}")
        if len(self.errors) > 0.01 * max(n, 1):
            raise RuntimeError(f"{len(self.errors)} of {n} submits failed, first: {self.errors[0]}")
        return self.submitted

    async def _one(self, sid: str, body: dict[str, Any], tags: dict[str, Any], started: float,
                   gate: asyncio.Semaphore) -> None:
        try:
            at = time.monotonic() - started
            rid = await submit(self.http, self.base, sid, body)
            self.submitted.append(Submitted(rid, at, tags))
        except Exception as error:  # reported after the run: one bad reply must not stop the load
            self.errors.append(str(error))
        finally:
            gate.release()


async def poll_tokens(http: aiohttp.ClientSession, base: str, stop: asyncio.Event, started: float,
                      every: float = 1.0, by: str = "tenant") -> list[tuple[float, dict[str, float]]]:
    """Cumulative token counters every `every` seconds until `stop` is set: [(t, {label: tokens})]."""
    timeline: list[tuple[float, dict[str, float]]] = []
    next_at = time.monotonic()
    while not stop.is_set():
        timeline.append((time.monotonic() - started, await token_counters(http, base, by)))
        next_at += every
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
    timeline.append((time.monotonic() - started, await token_counters(http, base, by)))
    return timeline
