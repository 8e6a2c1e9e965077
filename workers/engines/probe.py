"""What an OpenAI-compatible engine can do, learned live when a worker starts (and again, from its
heartbeats, until the engine answers: see NotUp).

Engines differ in exactly what a scheduler in front of them relies on, and most say nothing about it
in their OpenAI API: whether they take `priority`, whether they can continue a partial assistant
message (a resume), whether a stream reports usage, and how many requests they run at once (a
worker with more slots than the engine queues requests inside the engine, where no preemption
reaches them). So the worker asks:

1. which server it is, by an endpoint only that server has, all GETs that touch no model (asked at
   once): llama.cpp's `/props` (which also gives `total_slots`), vLLM's `/version`, SGLang's
   `/get_server_info` (`max_running_requests`), TGI's `/info` (`max_concurrent_requests`), Ollama's
   `/api/version`, llama-cpp-python's `/openapi.json` (its `/extras/tokenize/count`);
2. one streamed one-token request with `priority` and `stream_options.include_usage`: a 400 naming a
   field says it is refused; a usage chunk says streams report usage.

What the server's kind decides (from the engines' own code and docs, README "Engines"):
continuation (vLLM and SGLang with `continue_final_message`, llama.cpp's server and TGI by continuing
a final assistant turn; llama-cpp-python and Ollama close that turn and start over), the order of
`priority` (SGLang runs higher values first, vLLM lower ones), and the slots when the server says
them (TGI's is its admission cap). A server the probe cannot identify (OpenAI's own API, LiteLLM, LM
Studio, a gateway that hides the servers' endpoints), or does not ask (`--no-backend-probe`), is resumed
by regenerating: one that ignores `continue_final_message` would answer from the start, and that answer,
appended to what was streamed, would repeat it (`--backend-continue yes` when it is known to continue).
No slot count.

A server that is not up yet (nothing listening, or a 5xx: vLLM and SGLang open their port once the model
is loaded, llama.cpp answers 503 while it loads) is not "a server the probe cannot identify": its
defaults would stay for good. The probe raises NotUp, the worker starts with the defaults meanwhile and
probes again from its heartbeats until the server answers (workers/worker.py `_look_for_probe`).

A server that goes down later (restarted, reloading its model), or was never up: a run that cannot reach it
at all before its first token (nothing listening, or a 503; not a connection closed after the request went out)
fails with BackendDown (engines/base.py). Its worker hands it back without counting it as a failed attempt,
and stops offering its slots until its probe answers again: its requests go to the group's other workers, or
wait queued.
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


class NotUp(Exception):
    """The server answered none of the probe's calls as a server that is up (see the module's docstring)."""


@dataclass(frozen=True)
class Capabilities:
    server: str = "openai-compatible"
    slots: int | None = None  # requests the engine runs at once, when it says (None: unknown)
    accepts_priority: bool = True
    priority_higher_first: bool = False  # SGLang runs higher values first; vLLM lower ones
    # Can continue a partial assistant message (else a resume regenerates): only for a server identified
    # as one that can, or --backend-continue yes. A server not identified (the probe off, failed, or
    # unable to tell) might ignore `continue_final_message` and answer from the start: a resume by
    # continuation would then repeat what was streamed.
    continues: bool = False
    streams_usage: bool = True
    counts_tokens: bool = False  # has a tokenize-count endpoint (usage for an engine whose stream has none)
    budget_field: str = "max_tokens"  # "max_completion_tokens" where the server refuses max_tokens
    interrupts: bool = False  # may end a running stream with a bare [DONE] (llama-cpp-python's interrupt_requests)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


OPTIONAL_FIELDS = ("priority", "stream_options")  # what Sluicegate adds to a request, and a server may refuse
# Added too when the caller sent none and a resume would regenerate (openai.py `body`); the caller's own is
# the request's, never dropped: a server refusing it (LiteLLM's UnsupportedParamsError) answers the caller.
INJECTED_SEED = "seed"


def refused_field(status: int, payload: bytes, body: dict[str, Any],
                  ours: tuple[str, ...] = OPTIONAL_FIELDS) -> str | None:
    """The field of ours (`ours`: those Sluicegate added to this body) a 400 names (vLLM without priority
    scheduling: "...Priority scheduling is not enabled"), so that the request can go again without it;
    None for any other answer."""
    if status != 400:
        return None
    lowered = payload.lower()
    return next((f for f in ours if f in body and f.encode() in lowered), None)


def renamed_budget(status: int, payload: bytes, body: dict[str, Any]) -> bool:
    """A 400 refusing `max_tokens` for `max_completion_tokens` (OpenAI's reasoning models: "Unsupported
    parameter: 'max_tokens' ... Use 'max_completion_tokens' instead"): the body now asks by that name."""
    if status != 400 or "max_tokens" not in body or b"max_completion_tokens" not in payload.lower():
        return False
    body["max_completion_tokens"] = body.pop("max_tokens")
    return True


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


async def identify(session: aiohttp.ClientSession, base_url: str) -> Capabilities | None:
    """The server's kind, and what its own endpoints say about it, from GETs that touch no model (a busy
    one-at-a-time engine serves them at once, and is not interrupted by them); None: not known."""
    root = root_of(base_url)
    props, openapi, sglang, tgi, ollama, vllm = await asyncio.gather(
        _get_json(session, f"{root}/props"), _get_json(session, f"{root}/openapi.json"),
        _get_json(session, f"{root}/get_server_info"), _get_json(session, f"{root}/info"),
        _get_json(session, f"{root}/api/version"), _get_json(session, f"{root}/version"))
    if isinstance(props, dict) and "total_slots" in props:
        return Capabilities("llama.cpp", slots=int(props["total_slots"]), counts_tokens=True, continues=True)
    paths = openapi.get("paths") if isinstance(openapi, dict) else None
    if isinstance(paths, dict) and "/extras/tokenize/count" in paths:
        # llama-cpp-python: one request at a time, no usage in streams, `priority` dropped unread
        return Capabilities("llama-cpp-python", slots=ONE_AT_A_TIME["llama-cpp-python"],
                            streams_usage=False, counts_tokens=True, interrupts=True)
    if isinstance(sglang, dict) and ("max_running_requests" in sglang or "model_path" in sglang):
        slots = sglang.get("max_running_requests")
        return Capabilities("sglang", slots=int(slots) if isinstance(slots, int) else None, continues=True,
                            priority_higher_first=not sglang.get("schedule_low_priority_values_first", False))
    if isinstance(tgi, dict) and "max_concurrent_requests" in tgi:
        return Capabilities("tgi", slots=int(tgi["max_concurrent_requests"]), continues=True)  # a final assistant turn
    if isinstance(ollama, dict) and "version" in ollama:
        return Capabilities("ollama")
    if isinstance(vllm, dict) and "version" in vllm:
        return Capabilities("vllm", continues=True)
    return None


async def try_stream(session: aiohttp.ClientSession, base_url: str, model: str,
                     known: Capabilities | None) -> Capabilities:
    """One streamed one-token request with `priority` and `include_usage`: what the server refuses, and
    whether its stream reports usage. `known`: what identify() found; when it found nothing, a request
    that gets no answer, or a 5xx, raises NotUp (else it leaves what was known). A 503 raises NotUp
    whatever was found: a server that answers its version but not a chat is not serving (a run that got a
    503 withdrew its worker until this probe answers: passing it would hand the work back again at once)."""
    found = known or Capabilities()
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                            "stream": True, "stream_options": {"include_usage": True}, "priority": 4}
    accepts_priority, streams_usage = True, False
    for _ in range(4):  # at most: without priority, without stream_options, max_tokens renamed
        try:
            async with asyncio.timeout(PROBE_TIMEOUT), session.post(f"{base_url.rstrip('/')}/chat/completions",
                                                                    data=orjson.dumps(body)) as response:
                payload = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            if known is None:
                raise NotUp(f"the test request failed ({type(error).__name__}: {error})") from error
            log.warning("probing %s: the test request failed (%s); assuming defaults", base_url, error)
            return found
        field = refused_field(response.status, payload, body)
        if field is not None:
            accepts_priority = accepts_priority and field != "priority"
            body.pop(field)
            continue
        if renamed_budget(response.status, payload, body):
            found = replace(found, budget_field="max_completion_tokens")
            continue
        if response.status >= 500 and (known is None or response.status == 503):
            raise NotUp(f"the test request got HTTP {response.status}")
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
    """What the server is and can do; NotUp when it is not up yet. Known kinds whose answers the test
    request could not improve (llama-cpp-python: it would wait behind, or interrupt, a running stream) are
    not sent one."""
    found = await identify(session, base_url)
    if found is not None and found.server == "llama-cpp-python":
        return found
    return await try_stream(session, base_url, model, found)
