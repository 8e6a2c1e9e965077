"""The worker's view of the store: register slots, receive runs, append tokens, finish."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client, async_node_for_key, tcp_keepalive
from sluicegate.sessions.events import Event
from sluicegate.sessions.registry import declare_group, register_group
from sluicegate.sessions.resp import LeanRedis
from sluicegate.sessions.scripts import Scripts
from sluicegate.sessions.transitions import LOG_HEADER, MAX_ATTEMPTS, EndProgress, Offer, Tail, Transitions

log = logging.getLogger(__name__)
INBOX_BATCH = 64  # assignments read from a worker's inbox in one round trip (next_assignments)
# A run's end for a `"on_deadline_miss": "fail"` deadline that passed before its first token was written
# (`finish(outcome="failed", detail=DEADLINE_EXCEEDED)`; the store words the `error` event's message), and
# what the store answers a first token appended past it (sessions/lua/includes/requests.lua).
DEADLINE_EXCEEDED = "deadline_exceeded"
# How an engine words a request its backend refused before the first token (an HTTP 4xx that calling again
# will not change: a context too long, a bad parameter), then "HTTP <status>: <the backend's words>": the
# OpenAI front answers such a request with that status (api/openai_routes.py).
BACKEND_REFUSED_PREFIX = "the backend refused the request: "
BACKEND_REFUSED = re.compile(re.escape(BACKEND_REFUSED_PREFIX) + r"HTTP (4\d\d)\b")
TOOL_CALL_FIELDS = frozenset({"tool_calls", "function_call"})
REASONING_FIELDS = frozenset({"reasoning_content", "reasoning"})


def delta_kind(fields: Iterable[str]) -> str:
    """What non-text delta fields were, in the words of a tenant-facing message ("... streamed <kind>"):
    a run pinned for reasoning must not be said to have streamed a tool call."""
    names = set(fields)
    if names & TOOL_CALL_FIELDS:
        return "a tool call"
    if names and names <= REASONING_FIELDS:
        return "reasoning"
    return "a non-text delta"


def shown_info(info: str) -> dict[str, Any]:
    """What a worker registered for operators: JSON with its slots, engine and what the engine can do
    (a bare slot count from workers of earlier versions)."""
    try:
        shown = json.loads(info)
    except ValueError:
        return {"slots": 0}
    return shown if isinstance(shown, dict) else {"slots": int(shown)}


@dataclass(frozen=True)
class RunSpec:
    """Everything an engine needs to (re)start a request at `start_index`."""

    request_id: str
    attempt: str
    session_id: str
    group: str
    tenant: str
    priority: int
    max_tokens: int
    start_index: int
    input_kind: str
    input_text: str
    params: dict[str, Any]
    # ms left, when the run started, until the request's `"on_deadline_miss": "fail"` deadline (<= 0: passed);
    # None when no such deadline binds (none, "run", or its first token came in an earlier attempt)
    deadline_left_ms: float | None = None

    @property
    def prompt(self) -> str | None:
        return self.input_text if self.input_kind == "p" else None

    @property
    def messages(self) -> list[dict[str, Any]]:
        if self.input_kind == "m":
            return list(orjson.loads(self.input_text))
        return [{"role": "user", "content": self.input_text}]


    @classmethod
    def from_fields(cls, rid: str, attempt: str, f: dict[str, Any]) -> RunSpec:
        """From the request's fields, by their short names in the hash (`in` = the input text)."""
        return cls(request_id=rid, attempt=attempt, session_id=f.get("sid") or "", group=f.get("g") or "",
                   tenant=f.get("tn") or "", priority=int(f.get("p") or 5), max_tokens=int(f.get("mt") or 0),
                   start_index=int(f.get("n") or 0), input_kind=f.get("ik") or "p", input_text=f.get("in") or "",
                   params=json.loads(f.get("pa") or "{}"),  # not orjson: it refuses a lone surrogate
                   deadline_left_ms=None if f.get("dx") is None else float(f["dx"]))


@dataclass(frozen=True)
class Assignment:
    """One inbox entry: "rid|attempt", then (one server) a newline and the run spec as JSON, or (a
    cluster, INBOX_FORMAT 2) "|reason" when the control plane preempted the request's previous attempt
    (start_run in scheduler/lua/includes/runs.lua). An empty entry ("|") is the shutdown wake-up."""

    request_id: str
    attempt: str
    fields: dict[str, Any] | None = None
    taken_at: float | None = None  # the worker's clock (ms) when its inbox read returned it
    # Why the previous attempt was stopped (cluster): its `preempted` event says it, should this start
    # come before that attempt's hand-back.
    stopped_for: str = ""

    @property
    def key(self) -> str:
        return f"{self.request_id}|{self.attempt}"

    @classmethod
    def parse(cls, raw: bytes | str, taken_at: float | None = None) -> Assignment:
        """On one server the run spec follows (the run started already); on a cluster it does not."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        head, _, spec = text.partition("\n")
        rid, _, rest = head.partition("|")  # a request id has no "|" (sessions/requests.py)
        attempt, _, stopped_for = rest.partition("|")
        return cls(rid, attempt, orjson.loads(spec) if spec else None, taken_at, stopped_for)


@dataclass(frozen=True)
class AppendResult:
    ok: bool
    status: str = ""  # when fenced: the request's status now
    expected_index: int | None = None
    deadline_missed: bool = False  # a first token past a `fail` deadline: not written, the run ends failed


class RunStore:
    """A worker's calls. On one server the functions and the inbox go through lean connections
    (sessions/resp.py): the wake-up from the inbox and the first append lie on every first token's
    way. The inbox has a connection of its own, as its blocking pop holds every reply behind it. On a
    cluster everything goes through redis-py's cluster client, which routes each call to its slot."""

    def __init__(self, redis: Any, *, lean: Any, inbox: Any, worker_id: str, group: str,
                 lease_seconds: float, session_ttl: int, cluster: bool = False, model: str | None = None,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        self.redis = redis
        self.lean = lean
        self.inbox = inbox
        self.scripts = Scripts(lean, single_server=not cluster)
        self.transitions = Transitions(self.scripts, lease_ms=int(lease_seconds * 1000), session_ttl=session_ttl,
                                       max_attempts=max_attempts)
        self.worker_id = worker_id
        self.group = group
        self.model = model  # the group's model (--backend-model), declared with the slots
        self.cluster = cluster
        self.lease_ms = int(lease_seconds * 1000)
        self.session_ttl = session_ttl
        self.shown: dict[str, Any] = {}  # what operators see of this worker (engine, its capabilities)
        self.resume_mode = ""  # how its engine resumes a run, when it says (the `resumed` event says it)

    @classmethod
    def connect(cls, redis_url: str, *, worker_id: str, group: str, lease_seconds: float, session_ttl: int,
                client_name: str | None = None, reply_timeout: float = 15.0, cluster: bool = False,
                model: str | None = None, max_attempts: int = MAX_ATTEMPTS) -> RunStore:
        """A store with connections of its own, all named `client_name` (`CLIENT LIST`). A reply not
        back within `reply_timeout` (above the inbox's 1 s blocking pop and any script's run time)
        fails its connection, which reconnects: a half-open connection must not hang the worker."""
        if cluster:
            client = async_client(redis_url, cluster=True, client_name=client_name, socket_timeout=reply_timeout,
                                  socket_keepalive=True)
            return cls(client, lean=client, inbox=client, worker_id=worker_id, group=group,
                       lease_seconds=lease_seconds, session_ttl=session_ttl, cluster=True, model=model,
                       max_attempts=max_attempts)
        redis = Redis.from_url(redis_url, client_name=client_name, socket_timeout=reply_timeout,
                               socket_connect_timeout=5, **tcp_keepalive(redis_url))
        return cls(redis, lean=LeanRedis(redis_url, client_name=client_name, reply_timeout=reply_timeout),
                   inbox=LeanRedis(redis_url, client_name=client_name, reply_timeout=reply_timeout, blocking=True),
                   worker_id=worker_id, group=group, lease_seconds=lease_seconds, session_ttl=session_ttl,
                   model=model, max_attempts=max_attempts)

    async def aclose(self) -> None:
        if self.cluster:
            await self.redis.aclose()
            return
        await self.inbox.aclose()
        await self.lean.aclose()
        await self.redis.aclose()

    async def declare_model(self) -> str | None:
        """The group known to the schedulers and the admin API, with the model it serves (`self.model`),
        never over an operator's name for the group: only when it names none yet. Returns the model the
        group is declared with (None: none)."""
        try:
            named = await declare_group(self.redis, self.group, self.model, replace=False)
        except ValueError as error:  # the model is another group's (or not a name): serve without it
            log.warning("worker %s: model %r not registered for group %r: %s", self.worker_id, self.model,
                        self.group, error)
            await register_group(self.redis, self.group)
            return None
        if self.model is not None and named != self.model:
            log.warning("worker %s: group %r is declared as model %r; its model %r is sent to the backend but "
                        "not registered", self.worker_id, self.group, named, self.model)
        return named

    async def set_free_slots(self, free: int, total: int | None = None, held: Sequence[str] = ()) -> Offer:
        """Offer exactly `free` free slots of `total` to the scheduler, replacing every ticket offered
        before (so it is safe to repeat); `set_free_slots(0)` withdraws them all and deregisters. `held`:
        the runs counted out of `free`; the scheduler counts back those whose slot it handed over."""
        if free:
            await self.declare_model()
        total = free if total is None else total
        return await self.transitions.register_worker(self.group, self.worker_id, free=free, total=total,
                                                      shown=self.shown, held=held)

    async def next_assignment(self, timeout: float) -> Assignment | None:
        """The oldest assignment (the functions LPUSH them: runs start in the order they were dispatched),
        or None after `timeout` seconds: `next_assignments` for one."""
        taken = await self.next_assignments(timeout, most=1)
        return taken[0] if taken else None

    async def next_assignments(self, timeout: float, most: int = INBOX_BATCH) -> list[Assignment]:
        """The oldest assignments, up to `most`, in one round trip (BLMPOP): a burst of dispatches to this
        worker (a flood's runs ending and the next starting) is not read one round trip after another,
        each behind the worker's other work. Waits up to `timeout` seconds for the first."""
        inbox = keys.worker_inbox(self.group, self.worker_id)
        if self.cluster:  # routed by hand: BLMPOP's keys move, so redis-py would ask COMMAND GETKEYS first
            reply = await self.inbox.execute_command("BLMPOP", timeout, 1, inbox, "RIGHT", "COUNT", most,
                                                     target_nodes=await async_node_for_key(self.inbox, inbox))
        else:
            reply = await self.inbox.execute("BLMPOP", timeout, 1, inbox, "RIGHT", "COUNT", most)
        if reply is None:
            return []
        taken_at = time.time() * 1000
        return [Assignment.parse(item, taken_at) for item in reply[1]]

    async def drain_inbox(self) -> list[Assignment]:
        items = await self.redis.lpop(keys.worker_inbox(self.group, self.worker_id), 10_000) or []
        return [Assignment.parse(i) for i in items]

    async def wake_inbox(self) -> None:
        """Push an empty assignment ("|") so that a blocked `next_assignments` returns now."""
        await self.redis.rpush(keys.worker_inbox(self.group, self.worker_id), "|")

    async def spec(self, assignment: Assignment) -> RunSpec | None:
        """The run's inputs: carried in the assignment on one server (started already, no round trip
        unless the input was too long to carry); on a cluster the worker starts the run on the data
        plane, which answers with them. None when the request is no longer to run."""
        fields = assignment.fields
        if fields is None and not self.cluster:  # one server: started already, read it back
            return await self.load(assignment.request_id, assignment.attempt)
        if fields is None:
            fields = await self.transitions.start(assignment.request_id, assignment.attempt, self.worker_id,
                                                  resume=self.resume_mode, stopped_for=assignment.stopped_for)
            if fields is None:
                return None
        if "in" not in fields:
            text = await self.redis.get(keys.request_input(assignment.request_id))
            if text is None:
                return None
            fields = {**fields, "in": text.decode()}
        return RunSpec.from_fields(assignment.request_id, assignment.attempt, fields)

    async def load(self, rid: str, attempt: str) -> RunSpec | None:
        """The run's inputs read back from the request, or None when this worker does not own that
        attempt (what an assignment's carried spec must equal)."""
        names = ("st", "a", "w", "sid", "g", "tn", "p", "mt", "dn", "ik", "pa")
        values = await self.redis.hmget(keys.request(rid), names)
        text = await self.redis.get(keys.request_input(rid))
        f = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in zip(names, values, strict=True)}
        f["n"] = f.pop("dn")  # the attempt starts at the index it was started at
        f["in"] = text.decode() if isinstance(text, bytes) else text
        if f["st"] != "running" or f["a"] != attempt or f["w"] != self.worker_id:
            return None
        return RunSpec.from_fields(rid, attempt, f)

    async def append(self, rid: str, attempt: str, first_index: int, data: list[str],
                     engine_times: tuple[float, float, float] | None = None) -> AppendResult:
        reply = await self.transitions.append(rid, attempt, first_index, data, engine_times)
        code = int(reply[0])
        if code == 1:
            return AppendResult(True)
        if code == -1:
            expected = int(reply[1])
            if expected == first_index + len(data):
                # Our own batch already landed: the client resent it after losing the reply. Only
                # the owner of this attempt writes, so no one else can have moved the index here.
                return AppendResult(True)
            return AppendResult(False, "running", expected)
        if code == -2:
            return AppendResult(False, "running", deadline_missed=True)
        status = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        return AppendResult(False, status)

    async def finish(self, rid: str, attempt: str, *, outcome: str, detail: str, return_slot: bool,
                     usage: dict[str, Any] | None = None, tail: Tail | None = None,
                     progress: EndProgress | None = None) -> bool:
        """End a run (sessions/transitions.py `finish`); `tail`: its last tokens, appended by the same call."""
        return await self.transitions.finish(rid, attempt, wid=self.worker_id, group=self.group, outcome=outcome,
                                             detail=detail, return_slot=return_slot, usage=usage, tail=tail,
                                             progress=progress)

    async def hand_back(self, rid: str, attempt: str, *, reason: str, return_slot: bool,
                        never_ran: bool = False, progress: EndProgress | None = None) -> bool:
        return await self.transitions.hand_back(rid, attempt, wid=self.worker_id, group=self.group, reason=reason,
                                                return_slot=return_slot, never_ran=never_ran, progress=progress)

    async def pin(self, rid: str, attempt: str) -> bool:
        """Keep a running run from being preempted (see scheduler/lua/pin.lua); False when it was stopped."""
        return await self.transitions.pin(self.group, rid, attempt)

    async def output_so_far(self, spec: RunSpec) -> tuple[str, str | None]:
        """The text of tokens 0..start_index-1 of a request, from its session log (for resumes), and
        None when an engine can continue from it, else what its tokens' non-text deltas streamed
        (`delta_kind`: a tool call, reasoning), which no engine can be asked to continue. The log,
        bounded as it is (--session-log-max-events), never trims the events of its session's head
        request, which a resumed one is (sessions/lua/includes/call.lua, trim_log)."""
        first = int(await self.redis.hget(keys.request(spec.request_id), "fs") or 1)
        texts: list[str] = []
        delta_fields: set[str] = set()  # of every token's non-text delta (workers/runner.py token_data)
        cursor = first - 1
        while len(texts) < spec.start_index:
            reply = await self.transitions.read_log(spec.session_id, cursor, 1000)
            entries = [Event.parse(e) for e in reply[LOG_HEADER:]]
            if not entries:
                break
            for event in entries:
                if event.name == "token" and event.request_id == spec.request_id:
                    data = json.loads(event.data)
                    if data["index"] == len(texts):
                        texts.append(data["text"])
                        delta_fields.update(data.get("delta") or ())
            cursor = entries[-1].seq
        return "".join(texts[: spec.start_index]), delta_kind(delta_fields) if delta_fields else None

    async def heartbeat(self, running: list[str], *, leaving: bool = False) -> tuple[bool, list[str]]:
        """Renew liveness (unless leaving) and the runs' leases, reaping the group's dead workers.

        Returns (rejoin, lost): rejoin when this worker had lapsed or been reaped, so its free
        slots must be offered again; lost are the "rid|attempt" runs it no longer owns."""
        return await self.transitions.heartbeat(self.group, self.worker_id, running, leaving=leaving)
