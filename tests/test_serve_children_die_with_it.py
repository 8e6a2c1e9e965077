"""A SIGKILLed serve takes every child with it (Linux, PR_SET_PDEATHSIG), not only its store: the API (and,
with --api-processes 2, uvicorn's processes under it), the scheduler, the webhooks process and the workers
all end, and the API's port is free again for the next serve."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.test_serve_signals import end, wait_serving
from tests.test_serve_store_supervision import descendants, start_serve, wait_ended

pytestmark = pytest.mark.own_servers


def port_free(port: int) -> bool:
    """Nothing listens on the port (SO_REUSEADDR: a connection in TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("flags", [(), ("--api-processes", "2")], ids=["one-api-process", "api-processes-2"])
def test_a_sigkilled_serve_takes_every_child_with_it(tmp_path: Path, flags: tuple[str, ...]) -> None:
    log = tmp_path / "serve.log"
    proc, port = start_serve(tmp_path / "data", log, *flags)
    started: list[int] = []
    try:
        wait_serving(proc, port, log)
        # the store, API, scheduler, webhooks and one worker; with --api-processes 2, uvicorn's two under the API
        wait_for(lambda: len(descendants(proc.pid)) >= 5 + (2 if flags else 0), timeout=30,
                 what="serve's processes to start")
        started.extend(descendants(proc.pid))
        proc.kill()
        proc.wait()
        # old: only the store went; the API kept the port and answered /healthz, the workers ran on
        wait_ended(started, 60, "serve's children to end")
        wait_for(lambda: port_free(port), timeout=10, interval=0.2, what="the API's port to be free")
    finally:
        end(proc, started)
