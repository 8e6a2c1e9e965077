"""`sluicegate serve | redis | api | scheduler | worker | sim-backend | bench`.

Every flag is also an environment variable: `--session-ttl` <-> `SLUICEGATE_SESSION_TTL`. Flags
win over the environment, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import fields
from typing import Any

from sluicegate.settings import ENV_PREFIX, Settings, from_env

HELP: dict[str, str] = {
    "host": "address to bind (keep loopback unless auth is on)",
    "port": "port to listen on",
    "redis_url": "Redis/Valkey URL; default for serve: start the embedded Valkey server",
    "data_dir": "where the embedded server keeps its AOF (and serve its logs)",
    "appendfsync": "AOF fsync policy of the embedded server: everysec (lose <= 1 s on power loss) or always",
    "workers": "worker processes that serve starts",
    "group": "the consumer group (pool of workers, usually one model) this worker serves",
    "slots": "concurrent requests per worker process",
    "engine": "sim (paced deterministic text) or openai (any OpenAI-compatible server at --backend-url)",
    "backend_url": "base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8001/v1",
    "backend_api_key": "API key sent to the backend as a bearer token",
    "backend_model": "model name sent to the backend: `name` for all groups or `group=name,...`",
    "backend_timeout": "seconds to wait for the backend's next chunk before treating it as failed",
    "backend_retries": "attempts per request against a failing backend before it ends with an error",
    "sim_tokens_per_second": "sim engine pace per request",
    "sim_prefill_ms": "sim engine delay before the first token",
    "session_ttl": "seconds an idle session (and everything it owns) is kept",
    "auth": "require API keys (default: off on loopback, on elsewhere)",
    "admin_key": "the admin API key (auth on)",
    "max_body_mb": "largest request body accepted; larger ones get 413",
    "max_tokens_limit": "largest max_tokens accepted; larger ones get 422",
    "sse_ping_seconds": "idle seconds before an SSE keep-alive comment",
    "lease_seconds": "a run's lease: a worker silent for this long loses its runs to others",
    "heartbeat_seconds": "how often workers renew their leases",
    "shutdown_grace_seconds": "on SIGTERM, how long a worker lets runs finish before handing them back",
    "input_token_weight": "fair-share cost of an input token (w_in)",
    "output_token_weight": "fair-share cost of an output token (w_out)",
    "output_estimate_ratio": "share of max_tokens charged at dispatch, reconciled at the end",
    "max_wait_seconds": "max wait of every priority class before a request is promoted (aging)",
    "class_max_wait": "per-class max waits overriding --max-wait-seconds, e.g. `0=300,2=120`",
    "preempt_min_run_ms": "a run is not preempted before it has run this long (anti-thrash)",
    "max_preemptions": "a request is preempted at most this many times, then runs to the end (0 = never preempt)",
    "sweep_seconds": "scheduler sweep period (leases, aging, quota refills)",
    "log_level": "debug, info, warning or error",
}

NETWORK = ["host", "port"]
CORE = ["redis_url", "session_ttl", "lease_seconds", "log_level"]
API = ["auth", "admin_key", "max_body_mb", "max_tokens_limit", "sse_ping_seconds"]
POLICY = ["input_token_weight", "output_token_weight", "output_estimate_ratio", "max_wait_seconds",
          "class_max_wait", "preempt_min_run_ms", "max_preemptions", "sweep_seconds"]
WORKER = ["group", "slots", "engine", "backend_url", "backend_api_key", "backend_model", "backend_timeout",
          "backend_retries", "sim_tokens_per_second", "sim_prefill_ms", "heartbeat_seconds",
          "shutdown_grace_seconds"]
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "serve": ("everything in one process tree: embedded Valkey (unless --redis-url), API, scheduler and "
              "--workers N workers; Ctrl-C stops all of it",
              NETWORK + CORE + ["data_dir", "appendfsync", "workers"] + API + POLICY + WORKER),
    "redis": ("the embedded Valkey server alone, in the foreground, persistent (AOF) in --data-dir",
              ["host", "port", "data_dir", "appendfsync", "log_level"]),
    "api": ("the HTTP API alone (stateless; run several)", NETWORK + CORE + API),
    "scheduler": ("the scheduler alone (run several; they never double-dispatch)", CORE + POLICY),
    "worker": ("one worker process serving --group with --slots concurrent requests", CORE + WORKER),
    "sim-backend": ("an OpenAI-compatible server generating the sim engine's tokens at a fixed pace",
                    NETWORK + ["sim_tokens_per_second", "sim_prefill_ms", "log_level"]),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluicegate", description="Priority-aware scheduler in front of LLM inference servers.",
        epilog=f"Every flag is also an environment variable {ENV_PREFIX}<FLAG_IN_CAPS>.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = Settings()
    types = {f.name: f.type for f in fields(Settings)}
    for command, (description, names) in COMMANDS.items():
        p = sub.add_parser(command, help=description, description=description)  # defaults: in each help text
        for name in names:
            env = ENV_PREFIX + name.upper()
            text = f"{HELP[name]} [env {env}]"
            if "bool" in str(types[name]):
                p.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
                continue
            kind: Callable[[str], Any] = str
            if "float" in str(types[name]):
                kind = float
            elif "int" in str(types[name]):
                kind = int
            default = getattr(defaults, name)
            shown = f" (default: {default})" if default not in (None, "") else ""  # unset: the help says why
            p.add_argument(flag(name), dest=name, type=kind, default=None, help=text + shown)
    sub.add_parser("bench", help="run a benchmark scenario: `sluicegate bench --help` lists them", add_help=False)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}
    return from_env(**overrides)


def setup_logging(settings: Settings, role: str) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s")


def run_until_signalled(make: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run a service coroutine until SIGINT or SIGTERM, then let it stop gracefully."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await make(stop)

    try:
        import uvloop  # installed with uvicorn[standard]; measured lower latency per Redis round trip
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark harness parses its own arguments
        from loadtest.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as error:
        print(f"sluicegate: bad setting: {error}", file=sys.stderr)
        return 2
    setup_logging(settings, args.command)
    if args.command == "serve":
        from sluicegate.serve import serve

        return serve(settings)
    if args.command == "redis":
        from sluicegate.embedded import EmbeddedServer, ServerNotFound

        try:
            EmbeddedServer(data_dir=settings.data_dir, port=settings.port, host=settings.host,
                           appendfsync=settings.appendfsync).start(foreground=True)
        except ServerNotFound as error:
            print(f"sluicegate: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "api":
        import uvicorn

        if not settings.redis_url:
            print("sluicegate api: --redis-url is required", file=sys.stderr)
            return 2
        import os

        os.environ.update(settings.to_env())
        uvicorn.run("api.app:create_app", factory=True, host=settings.host, port=settings.port,
                    log_level=settings.log_level.lower(), access_log=False, timeout_graceful_shutdown=5)
        return 0
    if not settings.redis_url and args.command in ("scheduler", "worker"):
        print(f"sluicegate {args.command}: --redis-url is required", file=sys.stderr)
        return 2
    if args.command == "scheduler":
        from scheduler.loop import Scheduler

        run_until_signalled(Scheduler(settings).run)
        return 0
    if args.command == "worker":
        from workers.worker import Worker

        run_until_signalled(Worker(settings).run)
        return 0
    if args.command == "sim-backend":
        from workers.sim_backend import run_sim_backend

        run_sim_backend(settings)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
