"""Shared by the benchmark scenarios: start a stack, time things, print a table, write JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sluicegate.embedded import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "loadtest" / "results"
DOCS_DIR = ROOT / "docs"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.now(UTC).strftime("%Y-%m-%d")}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far: report it beside client-side throughput."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


def write_result(name: str, result: dict[str, Any], *, command: str | None = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"scenario": name, "machine": machine(), "command": command or " ".join(sys.argv), **result}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class ServeProcess:
    """`sluicegate serve` in a subprocess on a free port, with its own data dir (removed at stop).

    Scenarios that read Redis themselves start a `scratch_server()` and pass its URL as `redis_url`.
    """

    flags: list[str] = field(default_factory=list)
    redis_url: str | None = None
    port: int = 0
    data_dir: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ServeProcess:
        self.port = self.port or free_port()
        self.data_dir = tempfile.mkdtemp(prefix="sg-bench-")
        args = [sys.executable, "-m", "sluicegate", "serve", "--port", str(self.port), "--data-dir", self.data_dir,
                "--log-level", "warning", *self.flags]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        log = open(Path(self.data_dir) / "serve.log", "wb")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited; see {self.data_dir}/serve.log")
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("serve did not come up")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def scratch_server(persistent: bool = False) -> EmbeddedServer:
    """A fresh embedded Valkey on a free port for a scenario (stop() it when done)."""
    return EmbeddedServer(data_dir=tempfile.mkdtemp(prefix="sg-bench-valkey-"), persistent=persistent).start()
