"""Redis memory per queued request: each in its own session, 100-character prompt, no workers.

Measures INFO memory `used_memory` before and after N submissions (target <= 1 KB = 1024 B per
request; DESIGN's row is for a 100-character prompt: another `--prompt-chars` gets no verdict), then
MEMORY USAGE on a sample of every kind of key, so the table shows where the bytes go. `--via store`
(default) calls SessionStore.submit, the very script the API runs; `--via api` goes through
`sluicegate serve --workers 0` over HTTP. The server is a scratch Valkey without AOF.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import redis
from redis.asyncio import Redis

from sluicegate.loadtest.common import (
    ServeProcess,
    client_session,
    print_table,
    progress,
    scratch_server,
    write_result,
)
from sluicegate.loadtest.targets import MEMORY_BYTES_PER_REQUEST, MEMORY_PROMPT_CHARS, verdict_word
from sluicegate.sessions import keys
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.store import SessionStore
from sluicegate.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--requests", type=int, default=20_000, help="queued requests (try 100000, 1000000)")
    parser.add_argument("--prompt-chars", type=int, default=100, help="prompt length")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of each request")
    parser.add_argument("--tenants", type=int, default=1, help="spread the sessions over this many tenants")
    parser.add_argument("--via", choices=("store", "api"), default="store",
                        help="store: SessionStore.submit (the API's script); api: POST over HTTP")
    parser.add_argument("--concurrency", type=int, default=32, help="submissions in flight")
    parser.add_argument("--sample", type=int, default=500, help="keys of each kind measured with MEMORY USAGE")
    parser.add_argument("--server-binary", default=None, help="a redis-server/valkey-server to use instead")


def prompt_text(i: int, chars: int) -> str:
    return (f"q{i} " + "tell me about the river that runs under the stone mill " * 8)[:chars]


async def submit_store(url: str, args: argparse.Namespace, first: int) -> list[tuple[str, str]]:
    client = Redis.from_url(url, max_connections=args.concurrency)
    store = SessionStore(client, session_ttl=Settings().session_ttl, lease_seconds=Settings().lease_seconds)
    made: list[tuple[str, str]] = []
    counter = iter(range(first, first + args.requests))
    step = max(1, args.requests // 10)

    async def one_loop() -> None:
        for i in counter:
            req = NewRequest(session_id=f"mem-{i}", max_tokens=args.max_tokens, priority=5,
                             tenant=f"t{i % args.tenants}", group="default", prompt=prompt_text(i, args.prompt_chars))
            result = await store.submit(req)
            assert result.outcome == "ok", result
            made.append((req.session_id, req.request_id))
            if len(made) % step == 0:
                progress(f"{len(made)}/{args.requests} submitted")

    await asyncio.gather(*(one_loop() for _ in range(args.concurrency)))
    await client.aclose()
    return made


async def submit_api(base_url: str, args: argparse.Namespace, first: int) -> list[tuple[str, str]]:
    made: list[tuple[str, str]] = []
    counter = iter(range(first, first + args.requests))
    step = max(1, args.requests // 10)
    async with client_session(args.concurrency) as http:
        async def one_loop() -> None:
            for i in counter:
                sid = f"mem-{i}"
                body = {"prompt": prompt_text(i, args.prompt_chars), "max_tokens": args.max_tokens,
                        "tenant": f"t{i % args.tenants}"}
                async with http.post(f"{base_url}/v1/sessions/{sid}/requests", json=body) as response:
                    assert response.status == 202, await response.text()
                    made.append((sid, (await response.json())["request_id"]))
                if len(made) % step == 0:
                    progress(f"{len(made)}/{args.requests} submitted")

        await asyncio.gather(*(one_loop() for _ in range(args.concurrency)))
    return made


def used(client: redis.Redis) -> dict[str, int]:
    info = client.info("memory")
    return {"used_memory": int(info["used_memory"]), "dataset": int(info["used_memory_dataset"]),
            "keys": int(client.dbsize())}


def usage(client: redis.Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


# One request's own keys, by kind: each named by sessions/keys.py from the request's and its session's ids
# (the request's in its id's bucket, the session's in its id's: two hash tags, README "Keyspace").
OWN_KEYS: tuple[tuple[str, Callable[[str, str], str]], ...] = (
    ("request hash sg:{s:BB}:r:<rid>", lambda sid, rid: keys.request(rid)),
    ("request input sg:{s:BB}:r:<rid>:in", lambda sid, rid: keys.request_input(rid)),
    ("session log sg:{s:BB}:s:<sid>:l", lambda sid, rid: keys.session_log(sid)),
    ("session meta sg:{s:BB}:s:<sid>:m", lambda sid, rid: keys.session_meta(sid)),
    ("session queue sg:{s:BB}:s:<sid>:q", lambda sid, rid: keys.session_queue(sid)),
)
OWN_KEY = re.compile(r"^sg:\{s:[^}]*\}:(r|s):")  # a request's or a session's own key, of any bucket


def per_kind(client: redis.Redis, made: list[tuple[str, str]], sample: int) -> list[dict[str, Any]]:
    """Average MEMORY USAGE of each kind of a request's own keys over a random sample."""
    picked = random.Random(7).sample(made, min(sample, len(made)))
    rows = []
    for label, name_of in OWN_KEYS:
        names = [name_of(sid, rid) for sid, rid in picked]
        pipe = client.pipeline(transaction=False)
        for key in names:
            pipe.memory_usage(key, samples=0)
        sizes = [int(x or 0) for x in pipe.execute()]
        if not all(sizes):
            raise RuntimeError(f"{label}: {sizes.count(0)} of {len(names)} sampled keys are missing")
        mean = round(sum(sizes) / len(sizes), 1)
        encoding = client.object("encoding", names[0])
        rows.append({"kind": f"{client.type(names[0]).decode()} {label}", "keys": len(made),
                     "encoding": encoding.decode() if encoding else "", "bytes_each": mean, "bytes_per_request": mean})
    return rows


def shared_keys(client: redis.Redis) -> dict[str, int]:
    """MEMORY USAGE of every key that is not one request's or one session's own."""
    sizes = {}
    for key in client.scan_iter(count=1000):
        name = key.decode()
        if OWN_KEY.match(name):
            continue
        sizes[name] = usage(client, name)
    return sizes


def shared_label(name: str) -> str:
    """The kind of a shared key, as the breakdown groups them."""
    if re.match(r"^sg:\{g:[^}]*\}:rq$", name):
        return "ready specs, one a ready session sg:{g:G}:rq"
    if re.match(r"^sg:\{g:[^}]*\}:c\d+:", name):
        return "ready set: sessions of a tenant sg:{g:G}:c<P>:<T>"
    if re.match(r"^sg:\{g:[^}]*\}:age\d+$", name):
        return "aging zset sg:{g:G}:age<P>"
    if name.startswith("sg:{g:"):
        return "other group keys sg:{g:G}:*"
    if re.match(r"^sg:\{s:[^}]*\}:m$", name):
        return "metrics, a bucket's share sg:{s:BB}:m"
    if name.startswith("sg:{s:"):
        return "other bucket keys sg:{s:BB}:*"
    if name.startswith("sg:{t:"):
        return "a tenant's admitted requests sg:{t:T}:act"
    return "other global keys"


def shared_rows(before: dict[str, int], after: dict[str, int], n: int, client: redis.Redis) -> list[dict[str, Any]]:
    """Growth of the shared keys (ready specs and sets, aging, counters) over the run, divided by N."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in after:
        groups[shared_label(name)].append(name)
    rows = []
    for label, names in sorted(groups.items()):
        grown = sum(after[k] - before.get(k, 0) for k in names)
        encoding = client.object("encoding", names[0])
        rows.append({"kind": label, "keys": len(names), "encoding": encoding.decode() if encoding else "",
                     "bytes_each": round(sum(after[k] for k in names) / len(names), 1),
                     "bytes_per_request": round(grown / n, 1)})
    return rows


def memory_verdict(per_request: float, prompt_chars: int) -> bool | None:
    """Whether DESIGN's <= 1 KB per queued request holds; None for a prompt other than the row's 100 characters
    (the prompt is stored with the request, so another length measures another figure)."""
    return per_request <= MEMORY_BYTES_PER_REQUEST if prompt_chars == MEMORY_PROMPT_CHARS else None


def off_design(met: bool | None) -> str:
    """The target's verdict word, saying why there is none off DESIGN's setup."""
    return verdict_word(met, f"DESIGN's row is for a {MEMORY_PROMPT_CHARS}-char prompt")


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = scratch_server(binary=args.server_binary)
    serve: ServeProcess | None = None
    try:
        client = redis.Redis.from_url(server.url)
        version = client.info("server").get("valkey_version") or client.info("server")["redis_version"]
        if args.via == "api":
            serve = ServeProcess(flags=["--workers", "0"], redis_url=server.url).start()
        # Warm up: load the scripts, create the group's shared keys, so that "before" holds the fixed costs.
        warm = argparse.Namespace(**{**vars(args), "requests": 200, "concurrency": 4})
        asyncio.run(submit_api(serve.base_url, warm, 10**9) if serve else submit_store(server.url, warm, 10**9))
        before, shared_before = used(client), shared_keys(client)
        began = time.perf_counter()
        made = asyncio.run(submit_api(serve.base_url, args, 0) if serve else submit_store(server.url, args, 0))
        elapsed = time.perf_counter() - began
        after = used(client)
        n = len(made)
        per_request = (after["used_memory"] - before["used_memory"]) / n
        per_request_dataset = (after["dataset"] - before["dataset"]) / n
        rows = per_kind(client, made, args.sample) + shared_rows(shared_before, shared_keys(client), n, client)
        accounted = sum(r["bytes_per_request"] for r in rows)
        rows.append({"kind": "allocator, key table, expires (unaccounted)", "keys": "",
                     "encoding": "", "bytes_each": "", "bytes_per_request": round(per_request - accounted, 1)})
        rows.append({"kind": "TOTAL used_memory / N", "keys": after["keys"] - before["keys"], "encoding": "",
                     "bytes_each": "", "bytes_per_request": round(per_request, 1)})
        print(f"\n{n} queued requests (each its own session, {args.prompt_chars}-char prompt) via {args.via} "
              f"in {elapsed:.1f} s on {version}")
        print_table(rows)
        met = memory_verdict(per_request, args.prompt_chars)
        print(f"\nper queued request: {per_request:.0f} B used_memory ({per_request_dataset:.0f} B dataset); "
              f"target <= {MEMORY_BYTES_PER_REQUEST} B ({off_design(met)})")
        result = {"requests": n, "via": args.via, "server": version, "prompt_chars": args.prompt_chars,
                  "bytes_per_request": round(per_request, 1),
                  "dataset_bytes_per_request": round(per_request_dataset, 1),
                  "keys_per_request": round((after["keys"] - before["keys"]) / n, 3),
                  "before": before, "after": after, "breakdown": rows,
                  "target_bytes": MEMORY_BYTES_PER_REQUEST, "target_met": met, "seconds": round(elapsed, 2)}
        write_result("memory", result)
        return result
    finally:
        if serve is not None:
            serve.stop()
        server.stop()
