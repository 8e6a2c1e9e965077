"""`bench soak`'s verdict (loadtest/scenarios/soak.py): a well-behaved request that fails (submit refused, stream
ended other than `done`, abandoned) fails the run, and one with no first token is a miss (+inf) in its phase's
TTFT p99 instead of dropping out of it. The clients run against a stand-in HTTP server that refuses or fails."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sluicegate.loadtest.common import cpu_ticks
from sluicegate.loadtest.scenarios import soak

FAILED_STREAM = (b"id: 1\nevent: queued\ndata: {}\n\nid: 2\nevent: started\ndata: {}\n\n"
                 b'id: 3\nevent: error\ndata: {"error": "engine failed"}\n\n')


def new_soak(base: str) -> soak.Soak:
    """A soak whose clock is 100 s in, phase 1 having lasted 50 s: what it counts now is phase 2, past warm-up."""
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    args = parser.parse_args(["--drop-rate", "0", "--view-sample", "0"])
    bench = soak.Soak(args, base)
    bench.clock = soak.Clock(time.monotonic() - 100.0, 50.0)
    return bench


def against(submit_status: int, drive: Callable[[soak.Soak, aiohttp.ClientSession], Awaitable[None]]) -> soak.Soak:
    """Drive a soak's clients against a server whose submits answer `submit_status` and whose streams fail."""
    async def submit(request: web.Request) -> web.Response:
        if submit_status != 202:
            return web.Response(status=submit_status, text="over capacity")
        return web.json_response({"request_id": "r1"}, status=202)

    async def events(request: web.Request) -> web.Response:
        return web.Response(body=FAILED_STREAM, content_type="text/event-stream")

    async def main() -> soak.Soak:
        app = web.Application()
        app.router.add_post("/v1/sessions/{sid}/requests", submit)
        app.router.add_get("/v1/requests/{rid}/events", events)
        async with TestServer(app) as server, aiohttp.ClientSession() as http:
            bench = new_soak(str(server.make_url("")).rstrip("/"))
            await drive(bench, http)
        return bench

    return asyncio.run(main())


async def one_client_turn(bench: soak.Soak, http: aiohttp.ClientSession) -> None:
    task = asyncio.create_task(bench.client(http, 0, "t1", 0.0))
    await asyncio.sleep(0.3)  # one submit, refused; the client then waits 1 s before the next
    bench.stop.set()
    await asyncio.wait_for(task, 5)


async def one_failed_stream(bench: soak.Soak, http: aiohttp.ClientSession) -> None:
    await bench.follow(http, random.Random(1), "r1", 3, "t1", time.monotonic(), bench.clock.now())


def test_a_refused_submit_is_a_ttft_miss_of_its_phase() -> None:
    bench = against(503, one_client_turn)
    row = soak.ttft_row("2 (flooder)", bench.tally.phases[1])
    assert row["client_p99_ms"] == math.inf  # it used to drop out: no sample at all
    assert bench.tally.phases[1].failed == {"refused": 1} and bench.tally.phases[0].failed == {}


def test_a_stream_that_ends_in_error_before_a_token_is_a_miss() -> None:
    bench = against(202, one_failed_stream)
    assert soak.ttft_row("2 (flooder)", bench.tally.phases[1])["client_p99_ms"] == math.inf
    assert bench.tally.phases[1].failed == {"not_done": 1} and bench.tally.phases[1].no_first_token == 1


def report_of(bench: soak.Soak, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`report` on the soak's tally, with a clean stack's other figures (no leak, memory flat)."""
    written: dict[str, Any] = {}
    monkeypatch.setattr(soak, "write_result", lambda name, result: written.update(result))
    counters = {"done": {}, "tokens": {}, "preempted": {}}
    leaks = {"keys_left": 0, "fixed": 0, "fixed_shapes": {}, "leaked_data_keys": 0, "leaked_control_keys": 0,
             "keys_mentioning_run_ids": 0, "leaked": 0, "leaked_examples": []}
    out = {"soak": bench, "streams": {"t1": 1}, "samples": [{"t": t, "used_memory": 1, "dbsize": 1} for t in (0, 90)],
           "marks": [counters] * 3, "cpu_marks": [{}] * 3, "tick_marks": [cpu_ticks()] * 3, "load_end": 100.0,
           "drained_s": 0.0, "keys_at_idle": 0, "keys_at_idle_without_ttl": 0, "expire_wait_s": 0.0, "leaks": leaks,
           "idle_tickets": 4, "valkey_stalls": [{}, {}]}
    try:
        soak.report(bench.args, out, 1)
    except SystemExit:
        written["exited"] = True
    return written


def test_failed_requests_fail_the_run_and_the_ttft_target(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = against(503, one_client_turn)
    bench.tally.phases[0].ttft_client = [0.05] * 10  # phase 1 was fine
    result = report_of(bench, monkeypatch)
    assert result.get("exited") is True
    assert result["failures"] == ["phase 2: 1 well-behaved requests failed (refused 1)"]
    assert result["ttft_p99_ratio"]["client_met"] is False


def test_a_miss_without_the_flooder_is_no_pass_with_it() -> None:
    assert soak.p99_ratio(50.0, 60.0) == (1.2, True)
    assert soak.p99_ratio(math.inf, 60.0)[1] is False  # 60 / inf reads 0x: phase 1 failed, not phase 2 fine
    assert soak.p99_ratio(50.0, math.inf)[1] is False
    assert soak.p99_ratio(math.nan, 60.0)[1] is False


def test_a_clean_tally_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = new_soak("http://unused")
    bench.tally.phases[0].ttft_client = [0.05] * 10
    bench.tally.phases[1].ttft_client = [0.06] * 10
    result = report_of(bench, monkeypatch)
    assert "exited" not in result and result["failures"] == []
    assert result["ttft_p99_ratio"]["client_met"] is True
    assert json.loads(json.dumps(result["ttft"]))  # what write_result writes
