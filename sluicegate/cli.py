"""`sluicegate serve | redis | api | scheduler | worker | webhooks | sim-backend | migrate | bench`, and the client
commands `submit | tail | quota | weight | stats` (sluicegate/client_cli.py: they take no settings) and
`mcp` (sluicegate/mcp_server.py).

Every flag is also an environment variable (`--session-ttl` <-> `SLUICEGATE_SESSION_TTL`) and a key
of the `--config` TOML file (`session_ttl = 600`); the flags are built from the fields of
`sluicegate.settings.Settings`, which hold each setting's type, default and help text. Flags win over
the environment, which wins over the file, which wins over the defaults. A bad value from any of them
is one line on stderr and exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, get_args

from sluicegate import client_cli, mcp_server
from sluicegate.gc_tuning import settle_after_start_up
from sluicegate.settings import (
    ENV_PREFIX,
    GRACEFUL_SHUTDOWN_SECONDS,
    BadSetting,
    Settings,
    from_env,
    setting_names,
)

if TYPE_CHECKING:
    from sluicegate.groups_config import GroupConfig

NETWORK = ["host", "port"]
CORE = ["config", "redis_url", "redis_cluster", "rq_redis_url", "session_ttl", "lease_seconds", "max_attempts",
        "log_level"]
API = ["api_processes", "redis_max_connections", "auth", "admin_key", "metrics_key", "metrics_max_tenants",
       "max_body_mb", "max_tokens_limit", "sse_ping_seconds",
       "session_log_max_events", "cors_origins", "stream_token_ttl", "otel_endpoint"]
POLICY = ["input_token_weight", "output_token_weight", "output_estimate_ratio", "max_wait_seconds",
          "class_max_wait", "preempt_min_run_ms", "max_preemptions", "fair_share_preemption", "fair_share_headroom",
          "deadline_horizon", "deadline_promote_window", "deadline_max_boost", "deadline_forecast_factor",
          "sweep_seconds"]
WORKER = ["group", "slots", "engine", "backend_url", "backend_api_key", "backend_model", "backend_timeout",
          "backend_retries", "backend_probe", "backend_continue", "backend_first_token_timeout",
          "backend_idle_timeout", "stream_interval_ms", "sim_tokens_per_second",
          "sim_prefill_ms", "heartbeat_seconds", "shutdown_grace_seconds"]
WEBHOOKS = ["webhook_allow", "webhook_secret", "webhook_max_attempts", "webhook_backoff", "webhook_timeout"]
REDIS_PORT = 6379  # `sluicegate redis` without a port: Redis's own
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "serve": ("everything in one process tree: embedded Valkey (unless --redis-url), API, scheduler and "
              "--workers N workers; Ctrl-C stops all of it",
              NETWORK + CORE + ["data_dir", "appendfsync", "password", "embedded_cluster", "workers"] + API + POLICY
              + WORKER + WEBHOOKS + ["access_log"]),
    "redis": ("the embedded Valkey server (or with --cluster N a cluster of N masters) alone, in the foreground, "
              "persistent (AOF) in --data-dir; on Redis's own port, 6379 (from there up with --cluster), unless "
              "--port, SLUICEGATE_PORT or the --config file's port names one (their default, 8000, is the API's); "
              "a --data-dir that holds a cluster keeps its ports",
              ["config", "host", "port", "data_dir", "appendfsync", "password", "cluster", "log_level"]),
    "api": ("the HTTP API alone (stateless; run several)", NETWORK + CORE + API + WEBHOOKS + ["access_log"]),
    "webhooks": ("the callback deliveries (signed POSTs of ended requests' status, retried with backoff) and the "
                 "folding of usage counts; serve starts one (run several: each delivery is claimed by one)",
                 CORE + WEBHOOKS),
    "scheduler": ("the scheduler alone (run several; they never double-dispatch)", CORE + POLICY),
    "worker": ("one worker process serving --group with --slots concurrent requests",
               CORE + WORKER + ["otel_endpoint"]),  # serve has it from API
    "sim-backend": ("an OpenAI-compatible server generating the sim engine's tokens at a fixed pace",
                    ["config"] + NETWORK + ["sim_tokens_per_second", "sim_prefill_ms", "log_level"]),
    "migrate": ("move the sessions and requests of a deployment from the old key layout to this version's "
                "(stop the old API, scheduler and workers first); --dry-run shows what would move",
                ["config", "redis_url", "redis_cluster", "session_ttl", "lease_seconds", "log_level"]),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flag(parser: argparse.ArgumentParser, name: str, default: object = None) -> None:
    """The flag of setting `name`, from its field: help text, variable and real default (`default`: a
    command's own, as `sluicegate redis`'s port). Values stay strings here; the Settings model converts and
    validates them with the environment and the file."""
    info = Settings.model_fields[name]
    text = f"{info.description} [env {ENV_PREFIX}{name.upper()}]"
    if bool in (get_args(info.annotation) or (info.annotation,)):
        parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        return
    default = info.default if default is None else default
    shown = f" (default: {default})" if default not in (None, "") else ""  # unset: the help says why
    parser.add_argument(flag(name), dest=name, default=None, help=text + shown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluicegate", description="Priority-aware scheduler in front of LLM inference servers.",
        epilog=f"Every flag is also an environment variable {ENV_PREFIX}<FLAG_IN_CAPS> and a key of the --config "
               "file: flags > environment > file > defaults.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (description, names) in COMMANDS.items():
        p = sub.add_parser(command, help=description, description=description)  # defaults: in each help text
        for name in names:
            add_flag(p, name, REDIS_PORT if (command, name) == ("redis", "port") else None)
        if command == "migrate":  # not a setting: one run's choice
            p.add_argument("--dry-run", action="store_true", help="print what would move (a JSON line per "
                           "session) and change nothing")
    sub.add_parser("bench", help="run a benchmark scenario: `sluicegate bench --help` lists them", add_help=False)
    client_cli.add_commands(sub)
    mcp_server.add_command(sub)  # `sluicegate mcp`: the mcp extra is imported only when it runs
    return parser


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags on this command line."""
    return {name: getattr(args, name) for name in setting_names() if getattr(args, name, None) is not None}


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags, then the environment, then the --config file; raises BadSetting."""
    return from_env(**given_flags(args))


def port_named(settings: Settings) -> bool:
    """A flag, the environment or the --config file names the port (else it is the setting's default)."""
    return "port" in settings.model_fields_set


def redis_port(settings: Settings) -> int:
    """`sluicegate redis` listens on Redis's own port unless a flag, the environment or the file names one:
    the setting's default (8000) is the API's, and the two would clash when the pieces run apart."""
    return settings.port if port_named(settings) else REDIS_PORT


def setup_logging(settings: Settings, role: str) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s")


def run_until_signalled(make: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run a service coroutine until SIGINT, SIGTERM or SIGHUP (unless ignored: nohup), then let it stop
    gracefully (a worker hands its runs back: SIGHUP's default action would kill it with them)."""
    from sluicegate.embedded import stop_signals

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in stop_signals():
            loop.add_signal_handler(sig, stop.set)
        settle_after_start_up()
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
        from sluicegate.loadtest.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in client_cli.COMMANDS:  # HTTP clients of a running API: no server settings
        return client_cli.run(args)
    if args.command == "mcp":  # a stdio MCP server over the HTTP API (sluicegate/mcp_server.py)
        return mcp_server.run(args)
    groups: list[GroupConfig] = []
    try:
        settings = settings_from(args)
        if args.command == "serve":  # [groups.NAME] tables: checked before anything starts
            from sluicegate.groups_config import explicit_names, load_groups

            groups = load_groups(settings, explicit_names(given_flags(args)))
        if args.command in ("serve", "worker"):  # the commands that run workers (and take --heartbeat-seconds)
            settings.check_workers(engine=not groups)  # groups: each group's engine was checked by load_groups
        if settings.otel_endpoint:  # the extra is checked here, before anything starts
            from sluicegate.tracing import require_sdk

            require_sdk()
    except BadSetting as error:
        print(f"sluicegate: bad setting: {error}", file=sys.stderr)
        return 2
    setup_logging(settings, args.command)
    if settings.redis_url and args.command in ("serve", "api", "scheduler", "worker", "webhooks"):
        # A bad URL, a cluster with slots uncovered or a node down: one line and exit 1, never a hang.
        from sluicegate.sessions.connect import RedisUnavailable, check_redis

        try:
            check_redis(settings.redis_url, cluster=settings.redis_cluster)
        except RedisUnavailable as error:
            print(f"sluicegate {args.command}: {error}", file=sys.stderr)
            return 1
        if args.command in ("api", "scheduler", "worker"):  # `serve` runs these, each of which says it once
            from sluicegate.sessions.store_policy import log_eviction_problems

            log_eviction_problems(settings.redis_url, cluster=settings.redis_cluster)  # an ERROR; runs anyway
    if args.command == "serve":
        from sluicegate.serve import serve

        return serve(settings, groups)
    if args.command == "redis":
        from redis import RedisError

        from sluicegate.embedded import (
            DataDirInUse,
            DataDirMismatch,
            EmbeddedCluster,
            EmbeddedServer,
            ServerNotFound,
            announceable,
            data_dir_password,
            lock_store_dir,
            private_dir,
        )

        try:
            private_dir(settings.data_dir)  # before redis.url goes in: the AOF will hold every prompt
            # Held (by us and the server's processes) while it runs: a second store there would take over
            # the socket and append to the same AOF. Taken before redis.url is read.
            lock = lock_store_dir(settings.data_dir, settings.data_dir)
            password = data_dir_password(settings.data_dir) if settings.password else None
        except DataDirInUse as error:
            print(f"sluicegate redis: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"sluicegate redis: cannot use --data-dir {settings.data_dir}: {error}", file=sys.stderr)
            return 2
        if settings.cluster and not announceable(settings.host):
            print(f"sluicegate redis: --cluster needs --host to be one IP address of this host, not "
                  f"{settings.host}: the nodes tell each other (and the clients) that address", file=sys.stderr)
            return 2
        try:
            port = redis_port(settings)
            if settings.cluster:
                cluster = EmbeddedCluster(data_dir=settings.data_dir, port=port, masters=settings.cluster,
                                          host=settings.host, appendfsync=settings.appendfsync, password=password,
                                          lock=lock)
                if not port_named(settings):  # a restart comes back on the data dir's cluster's ports
                    cluster.port = cluster.existing_base_port() or port
                return cluster.run_foreground()  # a named port other than theirs: refused (DataDirMismatch)
            # A child, not an exec: Valkey ignores SIGHUP, and would outlive its closed terminal (run_foreground)
            return EmbeddedServer(data_dir=settings.data_dir, port=port, host=settings.host,
                                  appendfsync=settings.appendfsync, password=password, lock=lock).run_foreground()
        except ServerNotFound as error:
            print(f"sluicegate: {error}", file=sys.stderr)
            return 1
        except DataDirMismatch as error:  # before anything started: a bad setting
            print(f"sluicegate redis: {error}", file=sys.stderr)
            return 2
        except (RuntimeError, TimeoutError, ValueError, OSError, RedisError) as error:  # the cluster did not form
            print(f"sluicegate redis: {error}", file=sys.stderr)
            return 1
    if args.command == "migrate":
        from sluicegate.migrate import main as migrate_main

        return migrate_main(settings, dry_run=args.dry_run)
    if args.command == "api":
        import uvicorn

        from sluicegate.api.joined_writes import JoinedWritesProtocol

        if not settings.redis_url:
            print("sluicegate api: --redis-url is required", file=sys.stderr)
            return 2
        import os

        # Its processes (with --api-processes N) read these; not --config, which they must not read again.
        os.environ.pop(ENV_PREFIX + "CONFIG", None)
        os.environ.update(settings.child_env({}))
        # --api-processes N > 1: uvicorn's supervisor binds the port once and spawns N processes that accept
        # on that socket (each a whole API with its own Redis pool); SIGINT/SIGTERM to it stops them all, and
        # it restarts one that dies. The API keeps no state of its own, so they need nothing shared.
        uvicorn.run("sluicegate.api.app:serving_app", factory=True, host=settings.host, port=settings.port,
                    http=JoinedWritesProtocol,  # uvicorn's httptools protocol: a head goes out with its body
                    log_level=settings.log_level.lower(), access_log=settings.access_log,
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
                    workers=settings.api_processes if settings.api_processes > 1 else None)
        return 0
    if not settings.redis_url and args.command in ("scheduler", "worker", "webhooks"):
        print(f"sluicegate {args.command}: --redis-url is required", file=sys.stderr)
        return 2
    if args.command == "scheduler":
        from sluicegate.scheduler.loop import Scheduler

        run_until_signalled(Scheduler(settings).run)
        return 0
    if args.command == "webhooks":
        from sluicegate.webhooks.delivery import Delivery

        run_until_signalled(Delivery(settings).run)
        return 0
    if args.command == "worker":
        from sluicegate.workers.worker import Worker

        run_until_signalled(Worker(settings).run)
        return 0
    if args.command == "sim-backend":
        from sluicegate.workers.sim_backend import run_sim_backend

        run_sim_backend(settings)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
