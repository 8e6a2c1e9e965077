"""One settings object for every process, validated before any process starts.

Every field is a CLI flag (`--session-ttl`) and an environment variable
(`SLUICEGATE_SESSION_TTL`), and may be a top-level key of the `--config` TOML file
(`session_ttl = 600`). `from_env()` layers them: flags > environment > file > defaults. `serve`
hands its settings to its children through the environment, so a child sees exactly what its
parent was given.

`Settings(...)` itself takes only what it is given (plus the defaults): tests and callers build
exact settings, and only `from_env()` reads the environment and the file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sluicegate.sessions.keys import NAME_PATTERN

ENV_PREFIX = "SLUICEGATE_"
FILE_TABLES = ("groups",)  # the only tables a --config file may hold: [groups.NAME] (groups_config.py)
PRIORITY_NAMES = {"low": 2, "normal": 5, "high": 7, "critical": 9}
PRIORITY_CLASSES = range(10)
DEFAULT_SLOTS = 8
# Worker processes of one group that serve starts (each is a Python process of ~55 MB that runs many requests at
# once, its slots): a cap far above any one host's use, that refuses a typo (100000) before it starts them all.
MAX_WORKERS = 64
# How long an API process, once told to stop (SIGTERM, Ctrl-C), lets its open responses finish before uvicorn
# closes their connections (its timeout_graceful_shutdown); a chat stream ends itself just before (ShutdownEnd).
GRACEFUL_SHUTDOWN_SECONDS = 5


class BadSetting(ValueError):
    """One bad value: `field: reason` (the CLI prints `sluicegate: bad setting: <this>` and exits 2)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_class_max_wait(spec: str) -> dict[int, float]:
    """`0=300,2=120` -> {0: 300.0, 2: 120.0}; anything else is a ValueError naming the bad part."""
    waits: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        cls, _, secs = part.partition("=")
        try:
            priority, seconds = int(cls), float(secs)
        except ValueError:
            raise ValueError(f"`{part}` is not CLASS=SECONDS (e.g. 0=300,2=120)") from None
        if priority not in PRIORITY_CLASSES:
            raise ValueError(f"`{part}`: the class must be a priority 0..9")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"`{part}`: the wait must be a positive number of seconds")
        if priority in waits:
            raise ValueError(f"class {priority} is given twice")
        waits[priority] = seconds
    return waits


def parse_backend_models(spec: str) -> dict[str, str]:
    """`m` -> {"*": "m"}; `g1=m1,g2=m2` -> {"g1": "m1", "g2": "m2"}; a half pair is a ValueError."""
    spec = spec.strip()
    if not spec:
        return {}
    if "=" not in spec:
        return {"*": spec}
    models: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        group, _, model = (s.strip() for s in part.partition("="))
        if not group or not model:
            raise ValueError(f"`{part}` is not GROUP=MODEL (give one name for all groups, or group=name,...)")
        models[group] = model
    return models


def parse_cors_origins(spec: str) -> list[str]:
    """`http://a.test,https://b.test:8443` -> the origins; `*` is any origin; a path or a bare host is a
    ValueError (a browser sends the origin as scheme://host[:port], nothing more)."""
    origins = [part.strip() for part in spec.split(",") if part.strip()]
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s?#]+", origin):
            raise ValueError(f"`{origin}` is not an origin like http://127.0.0.1:3000 (scheme://host[:port], no path)")
    return origins


def _schemes(*schemes: str) -> AfterValidator:
    prefixes = tuple(f"{scheme}://" for scheme in schemes)

    def check(url: str) -> str:
        if not url.startswith(prefixes):
            raise ValueError(f"`{url}` should start with {' or '.join(prefixes)}")
        return url

    return AfterValidator(check)


def _host_and_port(url: str) -> str:
    """An http(s) URL a client can connect to: a host, and a port (if any) 1-65535. Otherwise a worker's HTTP
    client fails on it at every start (workers/engines/http1.py), under serve in restarts that never end."""
    try:
        parts = urlsplit(url)
    except ValueError as error:  # a bracket left open
        raise ValueError(f"`{url}` is not a URL ({error})") from None
    if not parts.hostname:
        raise ValueError(f"`{url}` names no host")
    try:
        port = parts.port
    except ValueError:  # out of range, or not a number
        port = 0
    if port == 0:
        raise ValueError(f"`{url}`: its port should be a number 1-65535")
    return url


def not_boolean(value: Any) -> Any:
    """A number field's before-check: pydantic's lax mode takes JSON true/false as 1/0 (`max_concurrency: true`
    a cap of 1, `max_queued: false` a limit that admits nothing), never what the caller meant."""
    if isinstance(value, bool):
        raise ValueError("a number, not a boolean")
    return value


NotBoolean = BeforeValidator(not_boolean)  # a number field's annotation: Annotated[int | None, NotBoolean]


def _takes_number(annotation: Any) -> bool:
    """The field's type is (or may be) an int or a float, under Annotated or in a union with None."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) in (Annotated, Union, types.UnionType):
        return any(_takes_number(arg) for arg in get_args(annotation))
    return False


def _off_or_a_cluster(masters: int) -> int:
    if 0 < masters < 3:
        raise ValueError(f"a Redis Cluster needs at least 3 masters, not {masters} (0 = one plain server)")
    return masters


def _checked(parse: Callable[[str], object]) -> AfterValidator:
    """Validate a spec string with its parser, keeping the string as given."""

    def check(spec: str) -> str:
        parse(spec)
        return spec

    return AfterValidator(check)


def _group_name(name: str) -> str:
    """A group name is part of Redis keys and of a worker's client name: one no client could use is refused here."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"`{name}` is not a group name (1-64 of A-Z a-z 0-9 . _ -)")
    return name


def parse_hosts(spec: str) -> list[str]:
    """`a.example.com, 127.0.0.1, [::1]` -> ["a.example.com", "127.0.0.1", "::1"] (host names, lowercased; no
    scheme or path). Each is compared with a callback URL's host as urlsplit gives it (no brackets, no port, no
    change to a trailing dot), so an entry that could never match is refused here, not by every callback's 422."""
    return [_allowed_host(h.strip().lower()) for h in spec.split(",") if h.strip()]


def _allowed_host(host: str) -> str:
    """One entry as a URL's hostname would be; ValueError naming it when no URL's could be."""
    if "/" in host or " " in host:
        raise ValueError(f"`{host}` is not a host name (give hosts only, e.g. hooks.example.com)")
    if host.startswith("[") and host.endswith("]") and _ipv6(host[1:-1]):
        return host[1:-1]  # a URL's IPv6 literal: its hostname has no brackets
    if "]:" in host or (":" in host and "[" not in host and not _ipv6(host)):
        raise ValueError(f"`{host}` has a port or is not a host name: give the host alone (any port of it is "
                         "allowed), an IPv6 address as ::1 or [::1]")
    if "[" in host or "]" in host:
        raise ValueError(f"`{host}` is not a host name (give hosts only, e.g. hooks.example.com)")
    if host.endswith("."):
        raise ValueError(f"`{host}` ends with a dot: give the name without it (hooks.example.com, not "
                         "hooks.example.com.)")
    if "*" in host:
        raise ValueError(f"`{host}`: no wildcards; list each host (an entry matches one host name exactly)")
    if not _ipv6(host) and any(ord(c) < 128 and not (c.isalnum() or c in "._-") for c in host):
        # userinfo (a@b), a query or fragment, a %-escape, a backslash: no URL's hostname is that text
        raise ValueError(f"`{host}` is not a host name a URL could have (give hosts only, e.g. hooks.example.com)")
    return host


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


LOG_MIN_EVENTS = 100  # the smallest --session-log-max-events (the Lua side never trims a log this short)
Port = Annotated[int, Field(ge=1, le=65535)]
Count = Annotated[int, Field(ge=1)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
RedisUrl = Annotated[str, _schemes("redis", "rediss", "unix")]
HttpUrl = Annotated[str, _schemes("http", "https"), AfterValidator(_host_and_port)]
ClusterSize = Annotated[int, Field(ge=0), AfterValidator(_off_or_a_cluster)]
OPTIONAL = ("config", "redis_url", "rq_redis_url", "backend_url", "backend_api_key", "auth", "admin_key", "slots",
            "metrics_key", "webhook_secret", "otel_endpoint")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    config: str | None = Field(None, description="a TOML file of settings, top-level keys named like the flags "
                               "with underscores (session_ttl = 600); flags and the environment override it")
    # network and storage
    host: str = Field("127.0.0.1", min_length=1, description="address to bind (keep loopback unless auth is on)")
    port: Port = Field(8000, description="port to listen on")
    redis_url: RedisUrl | None = Field(None, description="Redis/Valkey URL; default for serve: start the embedded "
                                       "Valkey server")
    redis_cluster: bool = Field(False, description="--redis-url names a node of a Redis Cluster (any node: the "
                                "client finds the others)")
    rq_redis_url: RedisUrl | None = Field(None, description="a standalone Redis for the workers' rq presence in "
                                          "cluster mode (rq has no cluster support, rq#1942); without it, rq "
                                          "presence is off in cluster mode")
    data_dir: str = Field("./.sluicegate", min_length=1, description="where the embedded Valkey keeps its AOF "
                          "and its log (serve's: under DATA_DIR/valkey, or DATA_DIR/valkey-cluster; serve itself "
                          "logs to stderr)")
    password: bool = Field(True, description="protect the embedded Valkey with a generated password, kept in the "
                           "URL file redis.url (mode 0600; serve's: DATA_DIR/valkey/redis.url, or "
                           "DATA_DIR/valkey-cluster/redis.url; redis's: DATA_DIR/redis.url) and reused on restart; "
                           "--no-password: none")
    appendfsync: Literal["everysec", "always"] = Field(
        "everysec", description="AOF fsync policy of the embedded server: everysec (lose <= 1 s on power loss) "
        "or always")
    embedded_cluster: ClusterSize = Field(0, description="start an embedded Valkey Cluster of N masters (N >= 3) "
                                          "instead of one server; 0 = one server")
    cluster: ClusterSize = Field(0, description="run a Valkey Cluster of N masters (N >= 3) on ports "
                                 "--port..--port+N-1 instead of one server; 0 = one server")
    # processes
    workers: int = Field(2, ge=0, le=MAX_WORKERS, description="worker processes that serve starts (0: run workers "
                         f"elsewhere; at most {MAX_WORKERS})")
    api_processes: Count = Field(1, description="API processes answering on --port (uvicorn workers sharing one "
                                 "listening socket): the API is stateless, so N processes use N cores")
    redis_max_connections: Annotated[int, Field(ge=4, le=10_000)] = Field(
        48, description="pooled Redis connections per API process on one server (plus one pipelined connection and "
        "one subscriber): callers past it wait for a free one instead of opening more, so 10,000 open streams take "
        "no more (a cluster keeps up to 256 per master: its client fails rather than waits past its bound)")
    group: Annotated[str, AfterValidator(_group_name)] = Field(
        "default", description="the consumer group (pool of workers, usually one model) this worker serves")
    slots: Count | None = Field(None, description="concurrent requests per worker process (default: as many as "
                                "the engine says it runs at once, else 8)")
    engine: Literal["sim", "openai"] = Field(
        "sim", description="sim (paced deterministic text) or openai (any OpenAI-compatible server at --backend-url)")
    backend_url: HttpUrl | None = Field(None, description="base URL of the OpenAI-compatible server, e.g. "
                                        "http://127.0.0.1:8001/v1")
    backend_api_key: str | None = Field(None, description="API key sent to the backend as a bearer token")
    backend_model: Annotated[str, _checked(parse_backend_models)] = Field(
        "", description="model name sent to the backend: `name` for all groups or `group=name,...`")
    backend_timeout: Positive = Field(60.0, description="seconds to connect to the backend (and to read its model "
                                     "list); reads of a stream are bounded by --backend-first-token-timeout and "
                                     "--backend-idle-timeout")
    backend_retries: Count = Field(4, description="tries of one attempt against a failing backend before the first "
                                   "token (connection refused, 5xx, 429, timeouts), with backoff; then the attempt "
                                   "fails (see --max-attempts)")
    backend_probe: bool = Field(True, description="at start, ask the backend what it can do (priority, "
                                "continuing a partial answer, usage in streams, requests at once); shown in "
                                "/v1/admin/stats")
    backend_continue: Literal["auto", "yes", "no"] = Field(
        "auto", description="resume a preempted run by continuing its partial answer (yes), by generating again and "
        "skipping what was streamed (no), or as the probe found (auto)")
    backend_first_token_timeout: Positive = Field(
        120.0, description="seconds a backend call may take to its first token (keep-alive comments do not count); "
        "past it the call fails as a transient failure")
    backend_idle_timeout: Positive = Field(
        30.0, description="seconds a backend call may stay silent between tokens (keep-alive comments do not "
        "count); past it the call fails as a transient failure")
    max_attempts: Count = Field(5, description="attempts a request gets whose backend calls fail or whose worker is "
                                "lost; then it ends with an `error` event and status failed (preemptions and "
                                "graceful hand-backs do not count: see --max-preemptions)")
    stream_interval_ms: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = Field(
        0.0, description="a run's tokens after its first are written to its log (and reach its readers) about "
        "once per this many ms, in one batch (sooner when 256 wait, or when the engine ends): fewer Redis calls "
        "and SSE writes per request for a fast engine, against up to this much delay on the tokens after the "
        "first (the first token is never held; SGLang's --stream-interval makes the same trade); 0: each batch "
        "leaves as soon as the one before is written")
    sim_tokens_per_second: Positive = Field(50.0, description="sim engine pace per request")
    sim_prefill_ms: NonNegative = Field(20.0, description="sim engine delay before the first token")
    # sessions and API
    session_ttl: Count = Field(3600, description="seconds an idle session (and everything it owns) is kept")
    session_log_max_events: Annotated[int, Field(ge=LOG_MIN_EVENTS)] = Field(
        10000, description="events each session's log keeps: older ones are trimmed, and a resume cursor before "
        "the oldest kept one gets 409 cursor_expired (the running request's own events are always kept)")
    auth: bool | None = Field(None, description="require API keys (default: off on loopback, on elsewhere)")
    admin_key: str | None = Field(None, description="the admin API key (auth on)")
    metrics_key: str | None = Field(None, description="a key that may read /metrics and nothing else (auth on: "
                                    "/metrics needs it or the admin key, as `Authorization: Bearer`)")
    metrics_max_tenants: Count = Field(20, description="tenants with a label of their own on /metrics (the first "
                                       "seen keep it for good, and one once summed stays summed, also when the cap "
                                       "is raised); the others are summed as tenant=\"~other\", so the series "
                                       "stay bounded")
    max_body_mb: Positive = Field(32.0, description="largest request body accepted; larger ones get 413")
    max_tokens_limit: Count = Field(32768, description="largest max_tokens accepted; larger ones get 422")
    sse_ping_seconds: Positive = Field(15.0, description="idle seconds before an SSE keep-alive comment")
    cors_origins: Annotated[str, _checked(parse_cors_origins)] = Field(
        "", description="browser origins allowed to call the API, comma-separated (e.g. https://app.example.com); "
        "CORS answers for them on every route, SSE included; default none")
    stream_token_ttl: Count = Field(300, description="seconds a stream token (POST /v1/stream-tokens, for "
                                    "EventSource's ?token=) may open its stream")
    # liveness
    lease_seconds: Positive = Field(2.5, description="a run's lease: a worker silent for this long loses its runs "
                                   "to others")
    heartbeat_seconds: Positive = Field(0.5, description="how often workers renew their leases (less than "
                                       "--lease-seconds)")
    shutdown_grace_seconds: NonNegative = Field(10.0, description="on SIGTERM, how long a worker lets runs finish "
                                                "before handing them back (one that streamed a tool call, reasoning "
                                                "or structured output, which no engine can continue, ends failed)")
    # scheduling policy
    input_token_weight: NonNegative = Field(1.0, description="fair-share cost of an input token (w_in)")
    output_token_weight: NonNegative = Field(2.0, description="fair-share cost of an output token (w_out)")
    output_estimate_ratio: NonNegative = Field(1.0, description="share of max_tokens charged at dispatch, "
                                               "reconciled at the end")
    max_wait_seconds: Positive = Field(60.0, description="max wait of every priority class before a request is "
                                      "promoted (aging)")
    class_max_wait: Annotated[str, _checked(parse_class_max_wait)] = Field(
        "", description="per-class max waits overriding --max-wait-seconds, e.g. `0=300,2=120`")
    preempt_min_run_ms: NonNegative = Field(50.0, description="a run is not preempted before it has run this long "
                                            "(anti-thrash)")
    max_preemptions: int = Field(20, ge=0, description="a request is preempted at most this many times, then runs "
                                 "to the end (0 = never preempt)")
    fair_share_preemption: bool = Field(True, description="with no free slot, the tenant next in the fair order "
                                        "takes the slot of a same-class run of the tenant furthest above its "
                                        "weighted share of the running slots (--no-fair-share-preemption: only "
                                        "priority preempts)")
    fair_share_headroom: float = Field(0.02, ge=0, le=0.5, description="while a tenant runs a slot or more below "
                                       "the one furthest above its share of the running slots, this share of a "
                                       "group's slots (rounded down) is kept for such tenants, so that they start "
                                       "at once instead of by a preemption (0: off)")
    deadline_horizon: NonNegative = Field(10.0, description="within a tenant's share, a request without a "
                                          "deadline ranks as one due this many seconds after it became ready")
    deadline_promote_window: NonNegative = Field(0.1, description="a request whose deadline is this near (s) "
                                                 "rises by up to --deadline-max-boost classes")
    deadline_max_boost: int = Field(1, ge=0, le=9, description="how many priority classes a request about to "
                                    "miss its deadline may rise (never above the highest class with work)")
    deadline_forecast_factor: NonNegative = Field(1.5, description="a request whose wait for its turn, at its "
                                                  "tenant's current pace and times this factor, exceeds its slack "
                                                  "ranks as missed at once (0 = only once its deadline passed)")
    sweep_seconds: Positive = Field(0.2, description="scheduler sweep period (leases, aging, quota refills)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug, info, warning or "
                                                                     "error")
    # operators: webhooks (webhooks/delivery.py), access log
    webhook_allow: Annotated[str, _checked(parse_hosts)] = Field(
        "", description="hosts a submit's callback_url may name, comma-separated (e.g. hooks.example.com,127.0.0.1); "
        "any other is refused with 422 callback_not_allowed; default: none (callbacks off)")
    webhook_secret: str | None = Field(None, description="key of the HMAC-SHA256 signature of every callback "
                                       "(X-Sluicegate-Signature: t=<unix>,v1=<hex of \"<t>.<body>\">)")
    webhook_max_attempts: Count = Field(8, description="deliveries tried per callback before it is marked failed")
    webhook_backoff: Positive = Field(5.0, description="seconds before the first retry of a failed delivery, "
                                      "doubling each time (8 attempts: about 10 minutes)")
    webhook_timeout: Positive = Field(10.0, description="seconds one callback attempt may take, whole answer "
                                      "included (a receiver that trickles it is cut there, to be retried)")
    access_log: bool = Field(False, description="log one line per HTTP request (uvicorn's access log)")
    otel_endpoint: HttpUrl | None = Field(
        None, description="OTLP/HTTP collector for OpenTelemetry traces, e.g. http://127.0.0.1:4318 (spans go to its "
        "/v1/traces): a span per submit and chat call (child of the caller's W3C traceparent) and per backend call, "
        "whose traceparent header goes to the backend; needs the otel extra; default none (off, nothing imported)")
    # tables of the config file that are not settings ([groups.NAME], ...), kept for the code that reads them
    extra: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_others: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # from_env() adds the environment and the file, in its precedence order

    @field_validator(*OPTIONAL, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A number setting refuses true/false: pydantic's lax mode takes them as 1/0, so a file's `session_ttl =
        true` expired every session after 1 s and `[groups.a] workers = true` meant one worker (the environment's
        text never parses as a boolean here; the quota keys refuse them the same way)."""
        if info.field_name is not None and _takes_number(cls.model_fields[info.field_name].annotation):
            return not_boolean(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.embedded_cluster and self.redis_url:
            raise BadSetting("embedded_cluster", "--embedded-cluster starts its own cluster: drop --redis-url, or "
                             "drop --embedded-cluster and pass --redis-cluster")
        if self.webhook_allow and not self.webhook_secret:
            raise BadSetting("webhook_secret", "--webhook-allow needs --webhook-secret: every callback is signed")
        if self.redis_cluster and not (self.redis_url or self.embedded_cluster):
            raise BadSetting("redis_cluster", "--redis-cluster needs --redis-url naming a node of the cluster "
                             "(or serve --embedded-cluster N)")
        return self

    def check_workers(self, *, engine: bool = True) -> None:
        """What workers need of these settings together; raises BadSetting. Checked by the commands that run
        workers (`worker`, `serve`), not on every Settings: the scheduler and the API take --lease-seconds but
        never heartbeat, and with `[groups.NAME]` tables each group may give its own backend_url (engine=False:
        groups_config checks each group's merged settings, naming the group)."""
        if engine and self.engine == "openai" and not self.backend_url:
            raise BadSetting("backend_url", "the openai engine needs --backend-url (e.g. http://127.0.0.1:8001/v1)")
        if self.heartbeat_seconds >= self.lease_seconds:
            raise BadSetting("heartbeat_seconds", f"{self.heartbeat_seconds} must be less than --lease-seconds "
                             f"({self.lease_seconds}), or workers lose their runs between heartbeats")

    @property
    def auth_enabled(self) -> bool:
        """Auth defaults to off on loopback and on everywhere else."""
        if self.auth is not None:
            return self.auth
        return self.host not in ("127.0.0.1", "localhost", "::1")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def class_max_waits(self) -> dict[int, float]:
        """Max wait per priority class 0..9: `--max-wait-seconds`, overridden by `--class-max-wait 2=120,7=10`."""
        return {p: self.max_wait_seconds for p in PRIORITY_CLASSES} | parse_class_max_wait(self.class_max_wait)

    @property
    def slots_or_default(self) -> int:
        """--slots, or 8 when the engine does not say (a worker asks it first: Worker.slots)."""
        return self.slots or DEFAULT_SLOTS

    def cors_origin_list(self) -> list[str]:
        return parse_cors_origins(self.cors_origins)

    def webhook_hosts(self) -> list[str]:
        """The hosts callbacks may call (--webhook-allow)."""
        return parse_hosts(self.webhook_allow)

    def backend_models(self) -> dict[str, str]:
        """Model name per group from `--backend-model`: `m` for all groups, or `g1=m1,g2=m2`."""
        return parse_backend_models(self.backend_model)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process. An unset one is "" (read back
        as unset: every nullable field is in OPTIONAL), so that a variable the parent inherited, which a flag
        such as `--admin-key ""` unset, does not reach the child and set it again."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude={"extra"}).items():
            if value is None:
                value = ""
            elif isinstance(value, bool):
                value = "1" if value else "0"
            env[ENV_PREFIX + name.upper()] = str(value)
        return env

    def child_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """`environ` with these settings, for a child process (serve's, the API's): without `config`, which
        it neither needs (every setting resolved from the file is there) nor may read again when it
        (re)starts: an edited or deleted file would give it other settings than its parent's, or exit 2."""
        variable = ENV_PREFIX + "CONFIG"
        return {**{k: v for k, v in environ.items() if k != variable},
                **{k: v for k, v in self.to_env().items() if k != variable}}

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, validated like any other settings."""
        return type(self)(**{**self.model_dump(), **changes})


def setting_names() -> list[str]:
    """Every setting a flag, a variable or the file may give (`extra` is the file's tables: FILE_TABLES)."""
    return [name for name in Settings.model_fields if name != "extra"]


def env_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings among `SLUICEGATE_*` variables of `environ` (default: this process's environment)."""
    source = EnvSettingsSource(Settings)
    if environ is not None:
        source.env_vars = {key.lower(): value for key, value in environ.items()}
    values = source()
    values.pop("extra", None)
    return values


def file_values(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, tables) of a TOML file: top-level keys are settings, the FILE_TABLES are kept whole; any
    other table would be kept and never read (a `[Groups.b]` beside `[groups.a]` drops a group, a
    `[server] port = 9000` leaves the port at its default), so it is refused by name, as an unknown key is."""
    if not Path(path).is_file():
        raise BadSetting("config", f"no such file: {path}")
    try:
        data = TomlConfigSettingsSource(Settings, toml_file=path).toml_data
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as error:  # TOML is UTF-8 only
        raise BadSetting("config", f"cannot read {path}: {error}") from None
    names = setting_names()
    values: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    for key, value in data.items():
        if key == "config":
            raise BadSetting(key, f"{path} cannot name another config file")
        if key in names:
            values[key] = value
        elif key in FILE_TABLES and not isinstance(value, dict):  # `groups = 3`, `[[groups]]`: no `group` typo
            raise BadSetting(key, f"give one table [{key}.NAME] per group, each with its keys (e.g. [{key}.a] "
                             f"then workers = 2), in {path}")
        elif isinstance(value, dict):
            check_table(key, path)
            tables[key] = value
        else:
            close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise BadSetting(key, f"not a setting, in {path}{hint}")
    return values, tables


def check_table(name: str, path: str) -> None:
    """Raise BadSetting unless `name` is one of the FILE_TABLES."""
    if name in FILE_TABLES:
        return
    close = difflib.get_close_matches(name.lower(), FILE_TABLES, n=1, cutoff=0.8)
    hint = (f"did you mean `[{close[0]}.NAME]`?" if close
            else "settings are top-level keys, before the first table; the tables are [groups.NAME]")
    raise BadSetting(name, f"not a table Sluicegate reads, in {path} ({hint})")


def bad_setting(error: ValidationError, origins: Mapping[str, str]) -> BadSetting:
    """The first problem of a ValidationError as one BadSetting, naming where the value came from."""
    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, BadSetting):
        return cause
    field = str(first["loc"][0]) if first["loc"] else "settings"
    reason = first["msg"].removeprefix("Value error, ")
    if first["type"] != "value_error":
        reason += f", got {first['input']!r}"
    if field in origins:
        reason += f" (from {origins[field]})"
    return BadSetting(field, reason)


def from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from explicit overrides (CLI flags), then `SLUICEGATE_*` variables, then the `config`
    TOML file, then the defaults. Raises BadSetting, naming the first bad value."""
    flags = {name: value for name, value in overrides.items() if value is not None}
    env = env_values(environ)
    path = flags.get("config") or env.get("config")
    file, tables = file_values(path) if path else ({}, {})
    origins = {name: path for name in file} if path else {}
    origins |= {name: ENV_PREFIX + name.upper() for name in env}
    origins |= {name: "--" + name.replace("_", "-") for name in flags}
    try:
        return Settings(**{"extra": tables, **file, **env, **flags})
    except ValidationError as error:
        raise bad_setting(error, origins) from None
