"""For the client tests: a real `sluicegate api` process on a fixed port that can be restarted (SIGTERM
or kill -9) while clients stream from it, with the scheduler and workers of an in-process Stack."""

from __future__ import annotations

import http.server
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sluicegate.embedded import free_port
from sluicegate.settings import Settings
from tests.helpers import Stack, call, spawn, stop_process, wait_for


class ApiProcess:
    """`sluicegate api` on one port across restarts, as an operator would restart it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> bool:
        try:
            return call("GET", f"{self.base_url}/healthz")[0] == 200
        except OSError:
            return False

    def start(self) -> ApiProcess:
        self.proc = spawn("api", self.settings, "--port", str(self.port))
        wait_for(self.up, timeout=30, interval=0.05, what="the API process to answer")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig)
            self.proc = None

    def restart(self, sig: int = signal.SIGTERM, down_for: float = 0.3) -> None:
        """Stop, stay down a while (clients see refused connections), start again on the same port."""
        self.stop(sig)
        time.sleep(down_for)
        self.start()

    def restart_in_background(self, sig: int = signal.SIGTERM, down_for: float = 0.3) -> threading.Thread:
        thread = threading.Thread(target=self.restart, args=(sig, down_for), daemon=True)
        thread.start()
        return thread


@contextmanager
def restartable_stack(settings: Settings) -> Iterator[ApiProcess]:
    """Scheduler and one worker in-process, the API in its own process."""
    stack = Stack(settings).start(api=False, workers=1)
    api = ApiProcess(settings)
    try:
        yield api.start()
    finally:
        api.stop(signal.SIGKILL)
        stack.stop()


def html_page(status: int, body: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    """Another app at a URL: every GET answered `status` with the HTML `body`; `hits` counts the requests."""

    class Page(http.server.BaseHTTPRequestHandler):
        hits = 0

        def do_GET(self) -> None:
            type(self).hits += 1
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    return Page


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on a free loopback port, in a thread: its base URL; shut down after."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
