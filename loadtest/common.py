"""Shared by the benchmark scenarios: start a stack, time things, print a table, write JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from sluicegate.embedded import EmbeddedServer, free_port
from sluicegate.sessions.events import SseParser

ROOT = Path(__file__).resolve().parent.parent
# In a checkout results go to loadtest/results/ and plots to docs/; from an installed wheel (no
# checkout around the package) both go to ./sluicegate-bench/ in the working directory.
IN_CHECKOUT = (ROOT / "pyproject.toml").is_file()
RESULTS_DIR = ROOT / "loadtest" / "results" if IN_CHECKOUT else Path.cwd() / "sluicegate-bench"
DOCS_DIR = ROOT / "docs" if IN_CHECKOUT else RESULTS_DIR


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): the smallest value with at least q% of the values at or below
    it; NaN for no values. (round() rounded halves to even, a rank too high whenever q% of n was odd.)"""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered) / 100 - 1e-9) - 1))
    return ordered[rank]


def cpu_identity(cpuinfo: str, l2_size: str | None = None) -> dict[str, Any]:
    """The CPU's name with what tells two hosts of one name apart (`/proc/cpuinfo`'s first processor).

    A VM's CPU is often named only "AMD EPYC": issue 15's runs met hosts of that one name whose figures
    differ by up to 1.8x, so the family, model and L2 go into every result and host line."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    identity: dict[str, Any] = {"cpu": fields.get("model name") or platform.processor() or platform.machine()}
    for key, name in (("cpu_family", "cpu family"), ("cpu_model", "model"), ("cpu_stepping", "stepping")):
        if fields.get(name, "").isdigit():
            identity[key] = int(fields[name])
    if l2_size:
        identity["l2_per_core"] = l2_size
    return identity


def describe_cpu(identity: dict[str, Any]) -> str:
    """One line for a host line: "AMD EPYC (family 26, model 2, L2 1024K a core)"."""
    details = [f"{label} {identity[key]}" for key, label in (("cpu_family", "family"), ("cpu_model", "model"))
               if key in identity]
    if "l2_per_core" in identity:
        details.append(f"L2 {identity['l2_per_core']} a core")
    return f"{identity['cpu']} ({', '.join(details)})" if details else str(identity["cpu"])


def host_line(steal: float, load_before: float, load_after: float) -> str:
    """How quiet the host was during a run, and which host it was: only quiet runs on one kind of host
    compare with each other."""
    return (f"host: {describe_cpu(machine())}; {steal:.1f}% of CPU time stolen by the hypervisor, 1-minute load "
            f"average {load_before:.2f} before and {load_after:.2f} after")


def machine() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    try:
        l2_size: str | None = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
    except OSError:
        l2_size = None
    return {**cpu_identity(cpuinfo, l2_size), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.now(UTC).strftime("%Y-%m-%d")}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far: report it beside client-side throughput."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) clock ticks of all CPUs so far, from /proc/stat ((0, 0) where it is missing).
    Steal is time the hypervisor gave this VM's CPUs to someone else: latency figures taken while it
    is high are not comparable with quiet ones."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return round(100 * (after[0] - before[0]) / total, 2) if total > 0 else 0.0


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(fmt(row.get(c, "")).ljust(widths[c]) for c in columns))


def invoked_command() -> str:
    """The command line that ran this benchmark, in a form to paste again (no venv path)."""
    program = Path(sys.argv[0]).name
    prefix = {"bench.py": "python -m sluicegate.loadtest.bench", "__main__.py": "python -m sluicegate"}.get(program,
                                                                                                         program)
    return shlex.join([prefix, *sys.argv[1:]]).replace(shlex.quote(prefix), prefix, 1)


def write_result(name: str, result: dict[str, Any], *, command: str | None = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"scenario": name, "machine": machine(), "command": command or invoked_command(), **result}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class CheckoutRefused(Exception):
    """Another checkout that this bench cannot run alone (the scenario exits 2 with this one line)."""


def checkout_python(checkout: Path) -> str:
    """The python that runs `checkout`'s code: this one for this tree, DIR/.venv/bin/python for another.

    This tree's python started in another DIR would run a mix of both trees: `sluicegate/` from DIR (the
    working directory comes first on sys.path) but sluicegate.api, .sessions, .workers ... from this tree
    (this venv's editable install maps them to this checkout's folders). So another DIR needs a .venv."""
    if checkout.resolve() == ROOT:
        return sys.executable
    own = checkout / ".venv" / "bin" / "python"
    if not own.is_file():
        raise CheckoutRefused(f"{checkout} has no .venv of its own ({own} is missing), and this tree's python would "
                              f"run a mix of both trees there: python3 -m venv {checkout}/.venv && "
                              f"{checkout}/.venv/bin/pip install -e {checkout}")
    return str(own)


def sluicegate_checkout(checkout: Path) -> None:
    """Refuse (CheckoutRefused) a DIR that is not a checkout of Sluicegate: its pyproject.toml must name the
    project. Otherwise `serve` there exits at once and a bench fails late, with a traceback and a scratch dir
    left behind, instead of in one line before anything starts."""
    if checkout.resolve() == ROOT:
        return
    pyproject = checkout / "pyproject.toml"
    try:
        name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise CheckoutRefused(f"{checkout} is not a checkout of sluicegate ({pyproject}: "
                              f"{type(error).__name__})") from None
    if name != "sluicegate":
        raise CheckoutRefused(f"{checkout} is not a checkout of sluicegate ({pyproject} names the project "
                              f"{name!r})")


def sluicegate_python(checkout: Path) -> str:
    """The python that runs `checkout`'s code (checkout_python), once the DIR is known to be a checkout of
    Sluicegate (sluicegate_checkout): the one check a bench makes of a tree it is to run."""
    python = checkout_python(checkout)
    sluicegate_checkout(checkout)
    return python


@dataclass
class ServeProcess:
    """`sluicegate serve` in a subprocess on a free port, with its own data dir (removed at stop).

    Scenarios that read Redis themselves start a `scratch_server()` and pass its URL as `redis_url`.
    """

    flags: list[str] = field(default_factory=list)
    redis_url: str | None = None
    checkout: Path = ROOT  # the code it runs: this one, or another checkout to compare against
    port: int = 0
    data_dir: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ServeProcess:
        python = sluicegate_python(self.checkout)  # another checkout only in its own .venv: CheckoutRefused
        self.port = self.port or free_port()
        self.data_dir = tempfile.mkdtemp(prefix="sg-bench-")
        args = [python, "-m", "sluicegate", "serve", "--port", str(self.port), "--data-dir", self.data_dir,
                "--log-level", "warning", *self.flags]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        try:
            with open(Path(self.data_dir) / "serve.log", "wb") as log:  # the child keeps its own copy
                self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                                cwd=self.checkout)
            self._wait_up(timeout)
        except BaseException:
            self.stop()  # a failed start leaves no process and no data dir behind (its log's tail is in the error)
            raise
        return self

    def _wait_up(self, timeout: float) -> None:
        """Until /healthz answers; a serve that exited or never answered raises with its log's last lines."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited ({self.process.returncode}); its log ended:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"serve did not come up in {timeout:g} s; its log ended:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((Path(self.data_dir) / "serve.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)


class ScratchServer(EmbeddedServer):
    """An embedded Valkey in a temp dir of its own, which its stop() removes: a bench leaves nothing in /tmp."""

    def stop(self, timeout: float = 10.0) -> None:
        try:
            super().stop(timeout)
        finally:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def scratch_server(persistent: bool = False, binary: str | None = None) -> ScratchServer:
    """A fresh embedded Valkey on a free port for a scenario (stop() it when done: that removes its data);
    `binary`: a redis-server/valkey-server to run instead of the embedded one."""
    server = ScratchServer(data_dir=tempfile.mkdtemp(prefix="sg-bench-valkey-"), persistent=persistent, binary=binary)
    server.start()
    return server


def wait_http(url: str, *, timeout: float = 60, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200 (or `process` exits, or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def wait_model(base_url: str, model: str, *, timeout: float = 60) -> None:
    """Poll Sluicegate's GET /v1/models until it lists `model`: a worker declares its models once it is up
    (after probing its engine), and a chat call naming one before then is refused with 404."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as response:
                if any(m.get("id") == model for m in json.loads(response.read()).get("data") or ()):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url}/v1/models did not list {model!r} in {timeout:g} s")


@dataclass
class Component:
    """One `sluicegate ROLE [flags]` subprocess (api, scheduler, worker, sim-backend), log in a temp dir.

    For scenarios that need the parts apart: kill one worker, measure one API process's CPU.
    """

    role: str
    flags: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self) -> Component:
        self.log_path = Path(tempfile.mkdtemp(prefix=f"sg-bench-{self.role}-")) / f"{self.role}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        args = [sys.executable, "-m", "sluicegate", self.role, "--log-level", "warning", *self.flags]
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd=ROOT)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no goodbye, no hand-back (a crashed worker)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 20) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.log_path is not None:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far; 0.0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _role_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    words = [a.decode(errors="replace") for a in argv if a]
    if words and ("valkey-server" in words[0] or "redis-server" in words[0]):
        return "valkey"
    if "llama_cpp.server" in words:
        return "llama-cpp-server"
    if "sluicegate" in words:
        after = words[words.index("sluicegate") + 1:]
        return after[0] if after else "sluicegate"
    if any("multiprocessing" in word for word in words):
        return ""  # a spawned child (`api --api-processes N`'s processes): counted under its parent's role
    return Path(words[0]).name if words else "?"


def cpu_by_role(root_pids: Sequence[int]) -> dict[str, float]:
    """CPU seconds so far of these processes and all their descendants, summed by role (api, worker, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    totals: dict[str, float] = {}
    todo = [(pid, "?") for pid in root_pids]
    while todo:
        pid, parent_role = todo.pop()
        role = _role_of(pid) or parent_role
        todo.extend((child, role) for child in children.get(pid, []))
        totals[role] = totals.get(role, 0.0) + process_cpu(pid)
    return totals


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: round(after.get(role, 0.0) - before.get(role, 0.0), 3) for role in sorted(set(before) | set(after))}


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: str


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    """The events of an SSE response body, as they arrive (comments and pings skipped)."""
    parser = SseParser()
    async for raw in response.content:
        wire = parser.feed(raw)
        if wire is not None:
            yield SseEvent(wire.id, wire.event, wire.data)


def client_session(connections: int = 0, *, force_close: bool = False) -> aiohttp.ClientSession:
    """An aiohttp session for benchmark clients (httpx costs ~7x the CPU per request here)."""
    connector = aiohttp.TCPConnector(limit=connections, force_close=force_close)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=120))
