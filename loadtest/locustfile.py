"""Load-test a running Sluicegate with Locust.

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 5m --host http://127.0.0.1:8000

Three kinds of users (pick some by naming them after the options: `... ChatUser ResumeUser`):
- ChatUser: submits with a mix of priorities, tenants and groups, streams the tokens over SSE and
  reports time to first token (`SSE ttft`) and inter-token gaps (`SSE inter_token_gap`) as their
  own entries, plus one `SSE stream` entry per request (a failure when the index sequence breaks).
- ResumeUser: drops its stream at random points and resumes with `Last-Event-ID` (request form)
  or `?after=` (session form); one `SSE resume_verified` entry per request, a failure on any gap,
  duplicate, reordered event id or a stream that ends early; `SSE resume_first_event` times a
  reconnect to its first replayed event.
- OperatorUser (one): changes tenant weights and group quotas mid-run, then resets them to
  permissive values (and again when the test stops), so a healthy stack shows zero failures.

A broken stream is a reported failure, never an exception. Every option is a flag or an
environment variable:
  --sg-priorities  SG_PRIORITIES   priority[:weight],...   (names low/normal/high/critical too)
  --sg-tenants     SG_TENANTS      name,... or a count N (tenant-0 .. tenant-N-1)
  --sg-groups      SG_GROUPS       group[:weight],...
  --sg-max-tokens  SG_MAX_TOKENS   N or LOW-HIGH
  --sg-think       SG_THINK        seconds between a user's requests, N or LOW-HIGH
  --sg-turns       SG_TURNS        requests per session before a user opens a new one
  --sg-drops       SG_DROPS        drops per resumed stream, N or LOW-HIGH
  --sg-operator-every SG_OPERATOR_EVERY   seconds between operator changes
  --sg-weights     SG_WEIGHTS      weights the operator picks from
  --sg-key         SG_KEY          bearer key sent with every call (auth on: the admin key)
At the end a line `sluicegate-locust: {...}` sums up streams checked and failures.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from locust import FastHttpUser, events, task
from locust.env import Environment

from sluicegate.sessions.events import SseParser

NAMES = {"low": 2, "normal": 5, "high": 7, "critical": 9}
TERMINAL = {"done", "error", "cancelled"}
OPTIONS = {  # option -> (env var, default, help)
    "sg_priorities": ("SG_PRIORITIES", "2:5,5:4,7:1", "priority[:weight],... (names low/normal/high/critical ok)"),
    "sg_tenants": ("SG_TENANTS", "acme,globex,initech,umbrella", "tenant names, or a count N"),
    "sg_groups": ("SG_GROUPS", "default", "group[:weight],..."),
    "sg_max_tokens": ("SG_MAX_TOKENS", "16-48", "max_tokens per request: N or LOW-HIGH"),
    "sg_think": ("SG_THINK", "0.05-0.5", "seconds between a user's requests: N or LOW-HIGH"),
    "sg_turns": ("SG_TURNS", "4", "requests per session before a user opens a new session"),
    "sg_drops": ("SG_DROPS", "1-3", "drops per resumed stream: N or LOW-HIGH"),
    "sg_operator_every": ("SG_OPERATOR_EVERY", "2", "seconds between operator changes"),
    "sg_weights": ("SG_WEIGHTS", "0.5,1,2,4,8", "tenant weights the operator picks from"),
    "sg_key": ("SG_KEY", "", "bearer key sent with every call (auth on: the admin key)"),
}


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    for name, (env, default, text) in OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=str, env_var=env, default=default,
                            help=f"{text} [env {env}]")


# ---- configuration ------------------------------------------------------------------------------
def span(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    return float(low), float(high or low)


def weighted(text: str, parse: Any = str) -> tuple[list[Any], list[float]]:
    """"a:3,b:1" -> ([a, b], [3, 1]); a missing weight is 1."""
    items, weights = [], []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        items.append(parse(name.strip()))
        weights.append(float(weight or 1))
    if not items:
        raise ValueError(f"empty list: {text!r}")
    return items, weights


def priority(text: str) -> int:
    return NAMES[text.lower()] if text.lower() in NAMES else int(text)


@dataclass(frozen=True)
class Config:
    priorities: tuple[list[int], list[float]]
    tenants: list[str]
    groups: tuple[list[str], list[float]]
    max_tokens: tuple[float, float]
    think: tuple[float, float]
    turns: int
    drops: tuple[float, float]
    operator_every: float
    weights: list[float]
    key: str

    @classmethod
    def load(cls, environment: Environment) -> Config:
        """From the parsed options, or from the environment when Locust runs as a library."""
        parsed = environment.parsed_options

        def get(name: str) -> str:
            env, default, _ = OPTIONS[name]
            value = getattr(parsed, name, None) if parsed is not None else None
            return str(value if value is not None else os.environ.get(env, default))

        tenants = get("sg_tenants")
        names = [f"tenant-{i}" for i in range(int(tenants))] if tenants.strip().isdigit() else tenants.split(",")
        return cls(priorities=weighted(get("sg_priorities"), priority), tenants=[t.strip() for t in names if t.strip()],
                   groups=weighted(get("sg_groups")), max_tokens=span(get("sg_max_tokens")),
                   think=span(get("sg_think")), turns=max(1, int(get("sg_turns"))), drops=span(get("sg_drops")),
                   operator_every=float(get("sg_operator_every")),
                   weights=[float(w) for w in get("sg_weights").split(",")], key=get("sg_key"))

    def body(self, rng: random.Random, tenant: str, group: str) -> dict[str, Any]:
        return {"prompt": f"load test {uuid.uuid4().hex[:8]}", "max_tokens": int(rng.uniform(*self.max_tokens) + 0.5),
                "priority": rng.choices(*self.priorities)[0], "tenant": tenant, "group": group}

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


# ---- SSE over Locust's geventhttpclient connection ------------------------------------------------
@dataclass(frozen=True)
class SseEvent:
    id: int
    name: str
    data: dict[str, Any]
    at: float  # perf_counter when it arrived


class StreamBroken(Exception):
    """Why a stream failed verification (reported as a Locust failure)."""


class SseStream:
    """Reads a streamed response line by line as it arrives; `drop()` closes its connection."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.raw = getattr(response, "_response", None)  # geventhttpclient's socket response

    def events(self) -> Iterator[SseEvent]:
        if self.raw is None:
            return
        parser = SseParser()
        while True:
            line = self.raw.readline(b"\n")
            if not line:
                return
            wire = parser.feed(line)
            if wire is not None:
                yield SseEvent(int(str(wire.id)), wire.event, json.loads(wire.data), time.perf_counter())

    def drop(self) -> None:
        """Close the connection mid-stream: it must never go back to the pool with unread data."""
        raw = self.raw
        if raw is None:
            return
        sock, pool = getattr(raw, "_sock", None), getattr(raw, "_pool", None)
        raw._sock, raw._pool = None, None
        if sock is not None:
            if pool is not None:
                pool.release_socket(sock)
            else:
                sock.close()


# ---- users ----------------------------------------------------------------------------------------
class SluicegateUser(FastHttpUser):
    """Shared by the traffic users: a session that lasts a few turns, submit, open a stream, report."""

    abstract = True
    network_timeout = 120.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.cfg = Config.load(self.environment)
        self.rng = random.Random()
        self.tenant = self.rng.choice(self.cfg.tenants)
        self.session_id = ""
        self.turns = 0

    def wait_time(self) -> float:
        return self.rng.uniform(*self.cfg.think)

    def next_session(self) -> str:
        if not self.session_id or self.turns >= self.cfg.turns:
            self.session_id = f"lt-{uuid.uuid4().hex[:16]}"
            self.tenant = self.rng.choice(self.cfg.tenants)  # a session belongs to one tenant
            self.turns = 0
        self.turns += 1
        return self.session_id

    def submit(self) -> tuple[str, str, dict[str, Any]] | None:
        sid = self.next_session()
        body = self.cfg.body(self.rng, self.tenant, self.rng.choices(*self.cfg.groups)[0])
        with self.client.post(f"/v1/sessions/{sid}/requests", json=body, headers=self.cfg.headers(),
                              name="/v1/sessions/[sid]/requests", catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"submit -> {response.status_code}: {(response.text or '')[:200]}")
                self.session_id = ""
                return None
            return sid, response.json()["request_id"], body

    def open(self, path: str, name: str, last_id: int | None = None) -> SseStream | None:
        headers = {**self.cfg.headers(), "Accept": "text/event-stream"}
        if last_id is not None and "?" not in path:
            headers["Last-Event-ID"] = str(last_id)
        response = self.client.get(path, name=name, headers=headers, stream=True)
        if response.status_code != 200:
            return None  # Locust already recorded the failed GET
        return SseStream(response)

    def report(self, name: str, started: float, length: int = 0, error: str | None = None) -> None:
        self.environment.events.request.fire(
            request_type="SSE", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=StreamBroken(error) if error else None, context={})

    def timing(self, name: str, millis: float) -> None:
        self.environment.events.request.fire(request_type="SSE", name=name, response_time=millis,
                                             response_length=0, exception=None, context={})


class Verifier:
    """Checks one request's events across any number of connections: ids strictly increase, token
    indices run 0, 1, 2, ... with none missing or doubled, and the terminal event agrees."""

    def __init__(self, request_id: str, max_tokens: int) -> None:
        self.request_id = request_id
        self.max_tokens = max_tokens
        self.last_id: int | None = None
        self.next_index = 0
        self.terminal: SseEvent | None = None

    def feed(self, event: SseEvent) -> bool:
        """Returns True for this request's events; raises StreamBroken on a violation."""
        if self.last_id is not None and event.id <= self.last_id:
            raise StreamBroken(f"event id {event.id} after {self.last_id} (duplicate or reordered)")
        self.last_id = event.id
        if event.data.get("request_id") != self.request_id:
            return False
        if event.name == "token":
            index = event.data.get("index")
            if index != self.next_index:
                kind = "gap" if isinstance(index, int) and index > self.next_index else "duplicate"
                raise StreamBroken(f"token {kind}: index {index}, expected {self.next_index}")
            self.next_index += 1
        elif event.name in TERMINAL:
            self.terminal = event
            if event.name != "done":
                raise StreamBroken(f"request ended with {event.name}: {event.data}")
            if event.data.get("tokens") != self.next_index or self.next_index > self.max_tokens:
                raise StreamBroken(f"done says {event.data.get('tokens')} tokens, saw {self.next_index} "
                                   f"(max_tokens {self.max_tokens})")
        return True


class ChatUser(SluicegateUser):
    """Submit, stream the answer, report TTFT and inter-token gaps."""

    weight = 6

    @task
    def chat(self) -> None:
        started = time.perf_counter()
        submitted = self.submit()
        if submitted is None:
            return
        _, rid, body = submitted
        verifier = Verifier(rid, body["max_tokens"])
        stream = self.open(f"/v1/requests/{rid}/events", "/v1/requests/[rid]/events")
        if stream is None:
            return
        previous: float | None = None
        try:
            for event in stream.events():
                verifier.feed(event)
                if event.name == "token":
                    if previous is None:
                        self.timing("ttft", (event.at - started) * 1000)
                    else:
                        self.timing("inter_token_gap", (event.at - previous) * 1000)
                    previous = event.at
            if verifier.terminal is None:
                raise StreamBroken(f"stream ended before a terminal event (after {verifier.next_index} tokens)")
        except StreamBroken as broken:
            stream.drop()
            self.report("stream", started, verifier.next_index, str(broken))
            return
        except Exception as error:  # a socket error mid-stream is a failure, not a crash
            stream.drop()
            self.report("stream", started, verifier.next_index, f"{type(error).__name__}: {error}")
            return
        self.report("stream", started, verifier.next_index)


class ResumeUser(SluicegateUser):
    """Drop the stream at random points, resume from the last event id, verify every token once."""

    weight = 3

    @task
    def chat_with_drops(self) -> None:
        started = time.perf_counter()
        submitted = self.submit()
        if submitted is None:
            return
        sid, rid, body = submitted
        verifier = Verifier(rid, body["max_tokens"])
        drops = int(self.rng.uniform(*self.cfg.drops) + 0.5)
        session_form = self.rng.random() < 0.5  # exercise both resume forms
        reconnects = 0
        try:
            while verifier.terminal is None:
                opened = time.perf_counter()  # before the connect: a reconnect is timed to its first replayed event
                stream = self._connect(sid, rid, verifier.last_id, session_form)
                if stream is None:
                    raise StreamBroken("could not (re)open the stream")
                budget = self.rng.randint(1, max(2, body["max_tokens"])) if drops > 0 else -1
                seen = 0
                for event in stream.events():
                    if seen == 0 and verifier.last_id is not None:
                        self.timing("resume_first_event", (event.at - opened) * 1000)
                    seen += 1
                    verifier.feed(event)
                    if verifier.terminal is not None or seen == budget:
                        break
                stream.drop()  # mid-stream, or a session stream that never ends by itself
                if verifier.terminal is None and seen != budget:
                    raise StreamBroken(f"stream ended early after {verifier.next_index} tokens")
                if verifier.terminal is None:
                    drops -= 1
                    reconnects += 1
        except StreamBroken as broken:
            self.report("resume_verified", started, verifier.next_index, f"{broken} (after {reconnects} resumes)")
            return
        except Exception as error:
            self.report("resume_verified", started, verifier.next_index,
                        f"{type(error).__name__}: {error} (after {reconnects} resumes)")
            return
        self.report("resume_verified", started, verifier.next_index)

    def _connect(self, sid: str, rid: str, last_id: int | None, session_form: bool) -> SseStream | None:
        if session_form:
            after = f"?after={last_id}" if last_id is not None else ""
            return self.open(f"/v1/sessions/{sid}/events{after}", "/v1/sessions/[sid]/events")
        return self.open(f"/v1/requests/{rid}/events", "/v1/requests/[rid]/events", last_id)


class OperatorUser(FastHttpUser):
    """One operator: tighten weights and quotas, then put permissive values back, in turns."""

    fixed_count = 1
    network_timeout = 30.0

    def on_start(self) -> None:
        self.cfg = Config.load(self.environment)
        self.rng = random.Random()
        self.tight = False

    def wait_time(self) -> float:
        return self.cfg.operator_every

    @task
    def change(self) -> None:
        if self.tight:
            self.reset()
        else:
            self.tighten()
        self.tight = not self.tight
        self.client.get("/v1/admin/stats", headers=self.cfg.headers(), name="/v1/admin/stats")

    def tighten(self) -> None:
        for tenant in self.rng.sample(self.cfg.tenants, k=min(3, len(self.cfg.tenants))):
            self.put(f"/v1/admin/tenants/{tenant}", {"weight": self.rng.choice(self.cfg.weights)},
                     "/v1/admin/tenants/[tenant]")
        for group in self.cfg.groups[0]:
            quota = {"requests_per_second": self.rng.choice([50, 100, 200]),
                     "tokens_per_second": self.rng.choice([5000, 10000, 20000]),
                     "burst": self.rng.choice([5, 10, 20]), "max_concurrency": self.rng.choice([4, 8, 16])}
            self.put(f"/v1/admin/groups/{group}", quota, "/v1/admin/groups/[group]")

    def reset(self) -> None:
        for tenant in self.cfg.tenants:
            self.put(f"/v1/admin/tenants/{tenant}", {"weight": 1.0}, "/v1/admin/tenants/[tenant]")
        for group in self.cfg.groups[0]:
            self.put(f"/v1/admin/groups/{group}", {"requests_per_second": None, "tokens_per_second": None,
                                                    "burst": None, "max_concurrency": None},
                     "/v1/admin/groups/[group]")

    def put(self, path: str, body: dict[str, Any], name: str) -> None:
        self.client.put(path, json=body, headers=self.cfg.headers(), name=name)

    def on_stop(self) -> None:
        self.reset()


@events.quitting.add_listener
def summary(environment: Environment, **_: Any) -> None:
    """One machine-readable line: how many streams were checked and how many failed."""
    stats = environment.stats
    resumed, streams = stats.get("resume_verified", "SSE"), stats.get("stream", "SSE")
    line = {"streams": streams.num_requests, "stream_failures": streams.num_failures,
            "resume_verified": resumed.num_requests - resumed.num_failures,
            "resume_failures": resumed.num_failures, "total_failures": stats.total.num_failures}
    print("sluicegate-locust: " + json.dumps(line), flush=True)
