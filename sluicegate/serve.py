"""`sluicegate serve`: the embedded server, the API, a scheduler and N workers in one process tree.

The embedded store is one Valkey server, or with `--embedded-cluster N` a Valkey Cluster of N
masters; either way the children get its URL (and `--redis-cluster` for a cluster). While it runs, its
dir is locked (embedded.lock_store_dir): a second serve or `sluicegate redis` on the same --data-dir is
refused (exit 2) rather than taking over its socket and AOF. Every child runs in a process group of its
own (the store in its own session), so a terminal's Ctrl-C or a closed terminal's SIGHUP (which reach the
whole foreground group) reach serve only, and serve stops the API (which then ends its open answers as at
SIGTERM: SIGHUP's default action would kill it at once), scheduler and workers first, and the store last,
after the workers have handed their runs back; on Linux a serve killed outright takes its store and every
other child with it (embedded.die_with_parent: SIGTERM, so they stop as gracefully as at Ctrl-C).
A worker or the webhooks process that dies is restarted (with its group's settings; one that keeps dying
quickly after a delay doubling up to 5 s); the API, the scheduler or the store dying stops everything with
exit code 1 (a supervisor above restarts serve; the AOF keeps the data).

Without `[groups.NAME]` tables in `--config`, the workers serve the one group `--group`. With them
(`sluicegate.groups_config`), each group is declared in Redis with its model and quota before any
worker starts, then gets its own workers with its own settings.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis import RedisError

from sluicegate.embedded import (
    STOP_SIGNALS,
    DataDirInUse,
    DataDirMismatch,
    EmbeddedCluster,
    EmbeddedServer,
    ServerNotFound,
    data_dir_password,
    die_with_parent,
    keep_url_file,
    lock_store_dir,
    private_dir,
    stop_signals,
)
from sluicegate.groups_config import GroupConfig
from sluicegate.scheduler import audit_log
from sluicegate.scheduler.admin import Tuning
from sluicegate.sessions.connect import UNAVAILABLE, async_client, redacted
from sluicegate.sessions.registry import DEFAULT_GROUP, declare_group, forget_group_model, group_models, model_conflict
from sluicegate.settings import Settings
from sluicegate.webhooks.delivery import SETTLE_SECONDS

log = logging.getLogger("sluicegate.serve")


def spawn(role: str, settings: Settings, *extra: str) -> subprocess.Popen[bytes]:
    """A child of serve, in a process group of its own: a terminal's signals (Ctrl-C, a hang-up's SIGHUP) reach
    serve only, which stops its children with SIGTERM, in order (the API has no SIGHUP handler: that signal
    would kill it with its answers cut). On Linux it gets SIGTERM when serve dies, even by SIGKILL
    (die_with_parent): a worker hands its runs back, the API frees its port (uvicorn's supervisor stops its
    own processes on SIGTERM), rather than running on as orphans that the next serve's store and port would meet."""
    env = settings.child_env(os.environ)  # not --config: a restarted child must not read the file again
    return subprocess.Popen([sys.executable, "-m", "sluicegate", role, *extra], env=env, stdin=subprocess.DEVNULL,
                            process_group=0,
                            preexec_fn=die_with_parent())  # serve starts no threads: preexec_fn is safe


def api_answers(settings: Settings) -> bool:
    """The API answers HTTP on its port (`/healthz`, no key needed). A TCP connect alone is not enough:
    with --api-processes N the supervisor listens before its processes serve."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    connection = http.client.HTTPConnection(host, settings.port, timeout=1.0)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):  # not up yet, or something else on the port (not HTTP)
        return False
    finally:
        connection.close()


def port_in_use(settings: Settings) -> bool:
    """Something listens on the API's address already (an earlier serve, a `sluicegate api`, any server): serve
    would start everything, announce "serving on" when that other server answers /healthz, then stop when its
    own API cannot bind. Each address is bound and closed at once, never held (serve's API binds it next);
    with SO_REUSEADDR, as uvicorn binds it, so a port left in TIME_WAIT by the last run is free; without
    SO_REUSEPORT, which would let this bind share a port its holder had opened with it. Any other failure
    (no such host, no IPv6) is left to the API to report, as before."""
    try:
        addresses = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):  # UnicodeError: a name IDNA cannot encode (`a..b`)
        return False
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio's server binds it: :: beside 0.0.0.0 is no clash
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
    return False


def embedded_store(settings: Settings) -> EmbeddedServer | EmbeddedCluster:
    """The store serve starts, password-protected unless --no-password (its URL, password included,
    goes to the children through their environment, and to DATA_DIR/<store>/redis.url, mode 0600). DATA_DIR
    and the store's dir under it are 0700: the AOF holds every prompt and output (embedded.private_dir).
    The store's dir is locked first, before its redis.url is read (its `lock`, held till serve ends).
    Raises DataDirInUse when another store holds it, OSError when the dirs cannot be (a file there, no
    permission)."""
    private_dir(settings.data_dir)
    directory = str(private_dir(Path(settings.data_dir) / ("valkey-cluster" if settings.embedded_cluster
                                                           else "valkey")))
    lock = lock_store_dir(directory, settings.data_dir)
    try:
        password = data_dir_password(directory) if settings.password else None
    except BaseException:
        os.close(lock)
        raise
    if settings.embedded_cluster:
        return EmbeddedCluster(data_dir=directory, masters=settings.embedded_cluster, appendfsync=settings.appendfsync,
                               password=password, lock=lock, size_flag="--embedded-cluster")
    return EmbeddedServer(data_dir=directory, appendfsync=settings.appendfsync, password=password, lock=lock)


def release(store: EmbeddedServer | EmbeddedCluster) -> None:
    """Close serve's fd of the store dir's lock, once its processes are gone (they hold it too)."""
    if store.lock is not None:
        os.close(store.lock)
        store.lock = None


def without_model(state: dict[str, Any]) -> dict[str, Any]:
    """A group's audited state but its model: what serve --config decides of a group whose table names none."""
    return {field: value for field, value in state.items() if field != "model"}


async def declare_groups(settings: Settings, groups: Sequence[GroupConfig]) -> None:
    """Each group, its model and the quota fields its table gives, before its workers start (so that
    chat requests route by model as soon as the API answers). The file has the last word on the groups
    it lists: each serves the model its table names, or none. So a group of the file that served
    another model, or whose table now names none, lets go of it first: a model may move from one group
    of the file to another, and two may swap models, between runs (a model given to such a group with
    PUT /v1/admin/groups, or by its openai workers from their backend, is let go of too; those workers
    declare theirs again when they start). Groups the file does not list are left as they are: a model
    one of them serves is a ModelConflict, raised before anything is written. Each group whose model or
    quota this changed gets an audit entry (key_id "config")."""
    assert settings.redis_url
    client = async_client(settings.redis_url, cluster=settings.redis_cluster, decode_responses=True)
    try:
        listed = frozenset(group.name for group in groups)
        for group in groups:
            if group.model is not None:
                conflict = await model_conflict(client, group.name, group.model, released=listed)
                if conflict is not None:
                    raise conflict
        before = {group.name: await audit_log.group_state(client, group.name) for group in groups}
        current = await group_models(client)
        for group in groups:
            if current.get(group.name) not in (None, group.model):
                await forget_group_model(client, group.name)
        for group in groups:
            await declare_group(client, group.name, group.model)
            if group.quota:
                await Tuning(client).set_quota(group.name, dict(group.quota))
        for group in groups:  # after all of them: a model that moved changed both groups
            was, after = before[group.name], await audit_log.group_state(client, group.name)
            if group.model is None:  # its model is its workers' (from their backend), let go of at every start
                was, after = without_model(was), without_model(after)
            if after != was:
                await audit_log.append(client, "config", "group.update", group.name, was, after)
    finally:
        await client.aclose()


def warn_no_default_workers(groups: Sequence[GroupConfig], pools: Sequence[Sequence[Settings]]) -> None:
    """One warning when the groups give `default` no worker: a chat call without `model` (and a submit without
    `group`) goes to `default`, and would wait there for a worker that this serve never starts."""
    if any(shares for group, shares in zip(groups, pools, strict=True) if group.name == DEFAULT_GROUP):
        return
    served = ", ".join(group.name for group, shares in zip(groups, pools, strict=True) if shares) or "none"
    log.warning("no workers for group %s (this serve's groups with workers: %s): a chat call without `model` "
                "or a submit without `group` goes to %s and waits until a worker of it runs elsewhere",
                DEFAULT_GROUP, served, DEFAULT_GROUP)


def share_engine(pool: Settings) -> list[Settings]:
    """The settings of each of `pool`'s workers. Workers that share one engine share its slots. Each worker
    takes its engine's slot count unless --slots is given (workers/worker.py); so when serve starts several
    workers in front of one engine, it asks the engine once and gives each worker its share, the first
    `total % workers` one slot more, so that every slot is used (and no more workers than slots: a
    one-at-a-time engine gets one worker)."""
    if pool.engine != "openai" or pool.slots is not None or not pool.backend_probe or pool.workers < 2:
        return [pool] * pool.workers
    from sluicegate.workers.engines.openai import OpenAIEngine

    async def ask() -> int | None:
        engine = OpenAIEngine.from_settings(pool)
        try:
            async with asyncio.timeout(30):
                return (await engine.probe(pool.group)).slots
        except Exception as error:  # not up yet: each worker asks it again when it starts
            log.warning("group %s: could not ask its engine how many requests it runs (%s)", pool.group, error)
            return None
        finally:
            await engine.aclose()

    total = asyncio.run(ask())
    if not total:
        return [pool] * pool.workers
    workers = min(pool.workers, total)
    share, more = divmod(total, workers)
    shares = [pool.replace(workers=workers, slots=share + 1 if index < more else share) for index in range(workers)]
    log.info("group %s: its engine runs %d requests at once: workers %s", pool.group, total, slot_split(shares))
    return shares


def slot_split(shares: Sequence[Settings]) -> str:
    """What the workers get, for the log: `2 x 2 slots` (2 workers of 2), `1 x 2 + 2 x 1 slots`,
    `2 x the engine's slots` (no --slots: each asks its engine), `0` (no workers)."""
    counts: dict[int | None, int] = {}
    for worker in shares:
        counts[worker.slots] = counts.get(worker.slots, 0) + 1
    if not counts:
        return "0"
    engines = "the engine's"
    return " + ".join(f"{n} x {slots or engines}" for slots, n in counts.items()) + " slots"


FIRST_RESTART_DELAY = 0.2  # s: a child that died is restarted after this, doubled each time it dies quickly ...
MAX_RESTART_DELAY = 5.0  # ... up to this: a child that cannot start (its store gone) is no busy loop
STABLE_SECONDS = 10.0  # a child that ran this long before dying starts over at FIRST_RESTART_DELAY


class Restarted:
    """A worker or the webhooks process: respawned when it dies, after a delay that doubles while it
    keeps dying within STABLE_SECONDS of its start."""

    def __init__(self, role: str, settings: Settings) -> None:
        self.role, self.settings = role, settings
        self.delay = 0.0
        self.restart_at: float | None = None  # set while it is dead and waits for its restart
        self.proc = spawn(role, settings)
        self.started = time.monotonic()

    def check(self, now: float) -> None:
        """Restart it when its delay is over; notice its death otherwise."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.proc, self.started, self.restart_at = spawn(self.role, self.settings), now, None
            return
        if self.proc.poll() is None:
            return
        quick = now - self.started < STABLE_SECONDS
        self.delay = min(2 * self.delay, MAX_RESTART_DELAY) if quick and self.delay else FIRST_RESTART_DELAY
        self.restart_at = now + self.delay
        group = f" of group {self.settings.group}" if self.role == "worker" else ""
        log.warning("%s %d%s exited with code %s; restarting it in %.1f s", self.role, self.proc.pid, group,
                    self.proc.returncode, self.delay)


def store_deaths(store: EmbeddedServer | EmbeddedCluster) -> list[str]:
    """The store's processes (the server, or each cluster node) that have exited, each with its code."""
    if isinstance(store, EmbeddedCluster):
        procs = [(f"embedded Valkey cluster node on port {store.port + index}", proc)
                 for index, proc in enumerate(store.processes)]
    else:
        procs = [(f"embedded Valkey server on port {store.port}", store.process)]
    return [f"the {what} (pid {proc.pid}) exited with code {proc.returncode}" for what, proc in procs
            if proc is not None and proc.poll() is not None]


def start_store(store: EmbeddedServer | EmbeddedCluster, settings: Settings) -> Settings:
    """Start the store and return the settings its children get."""
    store.start(new_session=True)
    # The children use the store we started: they start none themselves.
    keep_url_file(store.data_dir, store.url, store.password)
    # ... over its Unix socket when it has one (the URL file and the log name its TCP address, for tools)
    log.info("embedded Valkey %s on %s (AOF, appendfsync %s) in %s%s",
             f"cluster of {store.masters} masters" if isinstance(store, EmbeddedCluster) else "server",
             redacted(store.url), settings.appendfsync, store.data_dir,
             "; its processes connect over its Unix socket" if store.local_url != store.url else "")
    return settings.replace(redis_url=store.local_url, redis_cluster=store.cluster, embedded_cluster=0)


def interrupt(signum: int, _frame: object) -> None:
    """SIGINT, SIGTERM or SIGHUP while the store starts: abandon the start (serve kills the store it was
    starting, which runs in its own session, so no Ctrl-C reaches it). Further signals wait for that cleanup."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def serve(settings: Settings, groups: Sequence[GroupConfig] = ()) -> int:
    """Run the whole stack until SIGINT, SIGTERM or SIGHUP (a closed terminal: its default action would kill
    serve with no cleanup, and its store, in its own session, would run on; under nohup it stays ignored);
    `groups` are the checked `[groups.NAME]` tables (none: the one group `--group` with `--workers` workers).
    Returns the exit code."""
    stopping = False
    signals = stop_signals()  # before `interrupt` ignores them all

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    store: EmbeddedServer | EmbeddedCluster | None = None
    if not settings.redis_url:
        try:
            store = embedded_store(settings)
        except DataDirInUse as error:  # before its socket, password file or redis.url is touched
            print(f"sluicegate serve: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"sluicegate serve: cannot use --data-dir {settings.data_dir}: {error}", file=sys.stderr)
            return 2
    if port_in_use(settings):  # before anything starts; a script waiting for "serving on" would meet the other
        if store is not None:
            release(store)
        print(f"sluicegate serve: port {settings.port} is in use on {settings.host}: stop what listens there "
              "(another serve or `sluicegate api`?), or give another --port", file=sys.stderr)
        return 2
    if store is not None:
        # Until the stop handlers are in place, a signal abandons the start, and any failure kills the
        # store: it runs in its own session, so nothing else would ever stop it.
        for sig in signals:
            signal.signal(sig, interrupt)
        try:
            settings = start_store(store, settings)
            for sig in signals:
                signal.signal(sig, request_stop)
        except BaseException as error:
            store.kill()
            release(store)
            if isinstance(error, KeyboardInterrupt):
                print("sluicegate serve: stopped while its store was starting", file=sys.stderr)
                return 1
            if isinstance(error, DataDirMismatch):  # refused before it started: a bad setting
                print(f"sluicegate serve: {error}", file=sys.stderr)
                return 2
            if isinstance(error, (ServerNotFound, RuntimeError, TimeoutError, ValueError)):
                print(f"sluicegate serve: {error}", file=sys.stderr)
                return 1
            raise
    else:
        for sig in signals:
            signal.signal(sig, request_stop)
    if settings.redis_cluster and not settings.rq_redis_url:
        log.info("Redis Cluster without --rq-redis-url: the workers' rq presence is off (rq has no cluster "
                 "support, rq#1942)")

    core: dict[str, subprocess.Popen[bytes]] = {}
    workers: list[Restarted] = []
    webhooks: Restarted | None = None
    code = 0
    try:
        pools: list[list[Settings]] = []
        for pool in [group.worker_settings(settings) for group in groups] or [settings]:
            if stopping:  # asking an engine may take a while: a stop signal meanwhile ends the start-up here
                return code
            pools.append(share_engine(pool))
        if groups:
            try:
                asyncio.run(declare_groups(settings, groups))
            except (*UNAVAILABLE, RedisError, ValueError) as error:  # the store, or a model another group has
                log.error("cannot declare the groups of %s: %s", settings.config, error)
                return 1
            for group, shares in zip(groups, pools, strict=True):
                log.info("group %s: model %s, %s engine, workers %s", group.name, group.model or "-",
                         group.worker_settings(settings).engine, slot_split(shares))
            warn_no_default_workers(groups, pools)
        if stopping:
            return code
        core = {"scheduler": spawn("scheduler", settings), "api": spawn("api", settings)}
        webhooks = Restarted("webhooks", settings)  # callbacks and usage folding: restarted when it dies, like a worker
        for worker in (worker for shares in pools for worker in shares):
            if stopping:  # a stop signal while the workers start: start no more, stop those started (finally)
                break
            workers.append(Restarted("worker", worker))
        what = f"{len(groups)} groups, {len(workers)} workers" if groups else \
            f"{len(workers)} workers ({settings.engine} engine)"
        serving = f"serving on http://{settings.host}:{settings.port} with {what}"
        announced = False
        while not stopping:
            time.sleep(0.2)  # resumed after a signal handler ran (PEP 475): look at `stopping` first
            if stopping:  # a child that exits now (one signalled by hand, say) is no failure
                break
            if not announced and api_answers(settings):  # the line a script may wait for: the API answers
                log.info("%s", serving)
                announced = True
            for role, proc in core.items():
                if proc.poll() is not None:
                    log.error("%s exited with code %s; stopping", role, proc.returncode)
                    stopping, code = True, 1
            # The store runs in its own session: no Ctrl-C reaches it, so its death is always a failure.
            if store is not None and (deaths := store_deaths(store)):
                log.error("%s; stopping (see the logs in %s)", "; ".join(deaths), store.data_dir)
                stopping, code = True, 1
            if stopping:
                break
            now = time.monotonic()
            for child in (webhooks, *workers):
                child.check(now)
    finally:
        children = [proc for proc in (core.get("api"), *(w.proc for w in workers), core.get("scheduler"),
                                      webhooks.proc if webhooks else None) if proc]
        for proc in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # The workers' runs have the grace to end; the webhooks process's attempts in flight their own cap
        # and its settle time (webhooks/delivery.py): neither is cut at the other's.
        patience = max(settings.shutdown_grace_seconds, settings.webhook_timeout + SETTLE_SECONDS)
        deadline = time.monotonic() + patience + 5
        for proc in children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if store is not None:
            store.stop()
            release(store)
        log.info("stopped")
    return code
