"""What an OpenAI-compatible engine can do, learned live when a worker starts.

Engines differ in exactly what a scheduler in front of them relies on, and most say nothing about it
in their OpenAI API: whether they take `priority`, whether they can continue a partial assistant
message (a resume), whether a stream reports usage, and how many requests they run at once (a
worker with more slots than the engine queues requests inside the engine, where no preemption
reaches them). So the worker asks:

1. which server it is, by an endpoint only that server has: llama.cpp's `/props` (which also gives
   `total_slots`), vLLM's `/version`, SGLang's `/get_server_info` (`max_running_requests`), TGI's `/info`
   (`max_concurrent_requests`), Ollama's `/api/version`, llama-cpp-python's `/extras/tokenize/count`;
2. one streamed one-token request with `priority` and `stream_options.include_usage`: a 400 naming a
   field says it is refused; a usage chunk says streams report usage.

What the server's kind decides (from the engines' own code and docs, README "Engines"):
continuation (vLLM and SGLang with `continue_final_message`, llama.cpp's server and TGI by continuing
a final assistant turn; llama-cpp-python and Ollama close that turn and start over), the order of
`priority` (SGLang runs higher values first, vLLM lower ones), and the slots when the server says
them (TGI's is its admission cap). Anything the probe cannot learn keeps the behaviour of an unknown
OpenAI-compatible server: continuation tried, no slot count.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import aiohttp
import orjson

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 10.0  # seconds for each probe call
ONE_AT_A_TIME = {"llama-cpp-python": 1}  # servers that run one request at a time and have no endpoint saying so


@dataclass(frozen=True)
class Capabilities:
    server: str = "openai-compatible"
    slots: int | None = None  # requests the engine runs at once, when it says (None: unknown)
    accepts_priority: bool = True
    priority_higher_first: bool = False  # SGLang runs higher values first; vLLM lower ones
    continues: bool = True  # can continue a partial assistant message (else a resume regenerates)
    streams_usage: bool = True
    counts_tokens: bool = False  # has a tokenize-count endpoint (usage for an engine whose stream has none)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def root_of(base_url: str) -> str:
    """`http://host:port/v1` -> `http://host:port` (the servers' own endpoints live at the root)."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT), session.get(url) as response:
            if response.status != 200:
                return None
            return orjson.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def _post_ok(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bool:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT), session.post(url, data=orjson.dumps(body)) as response:
            await response.read()
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def identify(session: aiohttp.ClientSession, base_url: str) -> Capabilities:
    """The server's kind, and what its own endpoints say about it."""
    root = root_of(base_url)
    props = await _get_json(session, f"{root}/props")
    if isinstance(props, dict) and "total_slots" in props:
        return Capabilities("llama.cpp", slots=int(props["total_slots"]), counts_tokens=True)
    if await _post_ok(session, f"{root}/extras/tokenize/count", {"input": "a"}):
        return Capabilities("llama-cpp-python", slots=ONE_AT_A_TIME["llama-cpp-python"], continues=False,
                            counts_tokens=True)
    info = await _get_json(session, f"{root}/get_server_info")
    if isinstance(info, dict) and ("max_running_requests" in info or "model_path" in info):
        slots = info.get("max_running_requests")
        return Capabilities("sglang", slots=int(slots) if isinstance(slots, int) else None,
                            priority_higher_first=not info.get("schedule_low_priority_values_first", False))
    info = await _get_json(session, f"{root}/info")
    if isinstance(info, dict) and "max_concurrent_requests" in info:
        return Capabilities("tgi", slots=int(info["max_concurrent_requests"]))  # continues a final assistant turn
    version = await _get_json(session, f"{root}/api/version")
    if isinstance(version, dict) and "version" in version:
        return Capabilities("ollama", continues=False)
    version = await _get_json(session, f"{root}/version")
    if isinstance(version, dict) and "version" in version:
        return Capabilities("vllm")
    return Capabilities()


async def try_stream(session: aiohttp.ClientSession, base_url: str, model: str,
                     found: Capabilities) -> Capabilities:
    """One streamed one-token request with `priority` and `include_usage`: what the server refuses, and
    whether its stream reports usage."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                            "stream": True, "stream_options": {"include_usage": True}, "priority": 4}
    accepts_priority, streams_usage = True, False
    for _ in range(3):  # at most: without priority, then without stream_options
        try:
            async with asyncio.timeout(PROBE_TIMEOUT), session.post(f"{base_url.rstrip('/')}/chat/completions",
                                                                    data=orjson.dumps(body)) as response:
                payload = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("probing %s: the test request failed (%s); assuming defaults", base_url, error)
            return found
        if response.status == 400 and "priority" in body and b"priority" in payload.lower():
            accepts_priority = False
            body.pop("priority")
            continue
        if response.status == 400 and "stream_options" in body and b"stream_options" in payload.lower():
            body.pop("stream_options")
            continue
        if response.status != 200:
            log.warning("probing %s: the test request got HTTP %d; assuming defaults", base_url, response.status)
            return replace(found, accepts_priority=accepts_priority)
        for line in payload.splitlines():
            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                try:
                    chunk = orjson.loads(line[5:])
                except ValueError:
                    continue
                streams_usage = streams_usage or isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict)
        break
    return replace(found, accepts_priority=accepts_priority, streams_usage=streams_usage)


async def probe(session: aiohttp.ClientSession, base_url: str, model: str) -> Capabilities:
    found = await identify(session, base_url)
    return await try_stream(session, base_url, model, found)
