"""In a real Chromium (the system's, driven by Playwright; no browser is downloaded): the dashboard shows
what /v1/admin/stats says and its EventSource reconnects by itself when the API restarts; a page of
another origin, through CORS and a stream token, streams a request and resumes it by itself across
an API restart with no token index lost or doubled.

The API runs as its own process (`sluicegate api`) so that it can be restarted on the same port;
the scheduler and the workers run in-process. Skipped when playwright or chromium is missing
(`apt-get install -y chromium`; playwright comes with the `test` extra).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sluicegate.embedded import free_port
from sluicegate.settings import Settings
from tests.helpers import ON_CLUSTER, ROOT, Stack, call, fast_settings, spawn, stop_process, wait_for

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (it comes with the "
                               "`test` extra: pip install -e '.[test]'): browser tests skipped")
CHROMIUM = os.environ.get("SLUICEGATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium): "
                                "browser tests skipped")
ADMIN = "admin-secret"
# docs/dashboard.png is rewritten only when asked (SLUICEGATE_UPDATE_SCREENSHOT=1) or missing, so that a
# test run leaves the repository as it was; otherwise the screenshot goes to the test's tmp dir.
SCREENSHOT = Path(ROOT) / "docs" / "dashboard.png"


class ApiProcess:
    """`sluicegate api` on a fixed loopback port, restartable on that same port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.replace(host="127.0.0.1", port=free_port())
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def start(self) -> ApiProcess:
        self.proc = spawn("api", self.settings)
        wait_for(lambda: self.proc is not None and (self.proc.poll() is not None or self._answers()), timeout=30,
                 interval=0.1, what="the API to answer")
        assert self.proc.poll() is None, "the API exited"
        return self

    def _answers(self) -> bool:
        try:
            return call("GET", f"{self.base_url}/healthz")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def fleet(redis_url: str) -> Iterator[tuple[Stack, dict[str, Any]]]:
    """Scheduler and workers in-process; `settings` for the API process the test starts itself."""
    running: dict[str, Any] = {"settings": fast_settings(redis_url, auth=True, admin_key=ADMIN,
                                                         sim_tokens_per_second=40.0)}
    stack = Stack(running["settings"]).start(api=False, workers=1)
    yield stack, running
    for api in running.get("apis", []):
        api.stop()
    stack.stop()


def admin(method: str, api: ApiProcess, path: str, body: Any = None) -> Any:
    code, reply = call(method, api.base_url + path, body, headers={"authorization": f"Bearer {ADMIN}"})
    assert code < 300, (code, reply)
    return reply


def submit(api: ApiProcess, key: str, session_id: str, **body: Any) -> str:
    code, reply = call("POST", f"{api.base_url}/v1/sessions/{session_id}/requests", {"prompt": "hello", **body},
                       headers={"authorization": f"Bearer {key}"})
    assert code == 202, reply
    return reply["request_id"]


def test_the_dashboard_shows_the_stats_and_reconnects_by_itself(fleet: tuple[Stack, dict[str, Any]], browser: Any,
                                                                tmp_path: Path) -> None:
    stack, running = fleet
    api = ApiProcess(running["settings"].replace(sim_tokens_per_second=25.0)).start()
    running["apis"] = [api]
    admin("PUT", api, "/v1/admin/tenants/acme", {"weight": 3})
    admin("PUT", api, "/v1/admin/groups/batch", {"requests_per_second": 0.2, "burst": 1})  # throttled
    stack.add_worker(group="batch", slots=2)
    keys = {tenant: admin("POST", api, "/v1/admin/keys", {"tenant": tenant})["key"] for tenant in ("acme", "globex")}
    for i in range(6):  # more than the 4 slots: a queue by tenant and priority, and steady running requests
        for tenant, key in keys.items():
            submit(api, key, f"{tenant}-{i}", max_tokens=400, priority=(5, 5, 2)[i % 3])
    for i in range(4):
        submit(api, keys["globex"], f"batch-{i}", max_tokens=50, group="batch")

    page = browser.new_page(viewport={"width": 1280, "height": 560})
    page.goto(f"{api.base_url}/dashboard")
    page.wait_for_selector("#keyform:not([hidden])")  # auth on: the page asks for the admin key
    page.fill("#key", ADMIN)
    page.click("#keyform button[type=submit]")
    page.wait_for_function("() => window.sluicegate.updates > 0", timeout=5000)
    assert page.evaluate("sessionStorage.getItem('sluicegate.adminKey')") == ADMIN
    assert ADMIN not in page.evaluate("performance.getEntriesByType('resource').map(e => e.name).join(' ')")

    def running_matches() -> None:
        """The page shows /v1/admin/stats's running count within 2 s."""
        for _ in range(3):  # a count that moved while the page caught up is asked again
            expected = admin("GET", api, "/v1/admin/stats")["running"]
            try:
                page.wait_for_function(f"() => document.getElementById('running').textContent === '{expected}'",
                                       timeout=2000)
                assert expected > 0
                return
            except sync_api.TimeoutError:
                continue
        raise AssertionError("the dashboard's running count did not follow /v1/admin/stats within 2 s")

    running_matches()
    page.wait_for_function("() => window.sluicegate.last.tokens_per_second.total > 0 && "
                           "window.sluicegate.last.tenant_share.length == 2", timeout=5000)
    shot = SCREENSHOT if os.environ.get("SLUICEGATE_UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists() else \
        tmp_path / "dashboard.png"
    if ON_CLUSTER:
        shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    rows = {line.split("\t")[0]: line.split("\t") for line in page.inner_text("#tenants").splitlines() if line}
    assert (rows["acme"][5], rows["globex"][5]) == ("75.0%", "25.0%")  # the fair shares, weights 3 and 1

    # The API restarts: the stream drops and the same EventSource reconnects by itself (no new one)
    opens = page.evaluate("window.sluicegate.opens")
    api.restart()
    page.wait_for_function(f"() => window.sluicegate.opens > {opens}", timeout=15000)
    updates = page.evaluate("window.sluicegate.updates")
    page.wait_for_function(f"() => window.sluicegate.updates > {updates}", timeout=5000)
    assert page.evaluate("window.sluicegate.sources") == 1
    running_matches()
    page.close()


PAGE = """<!doctype html><meta charset="utf-8"><title>another origin</title><script>
const q = new URLSearchParams(location.search);
window.seen = []; window.opens = []; window.done = null; window.errors = 0;
(async () => {
  const headers = {authorization: "Bearer " + q.get("key"), "content-type": "application/json"};
  const answer = await fetch(q.get("api") + "/v1/stream-tokens",
                             {method: "POST", headers, body: JSON.stringify({request_id: q.get("rid")})});
  const token = await answer.json();
  const source = new EventSource(q.get("api") + token.events_url);
  source.onopen = () => window.opens.push(window.seen.length);
  source.onerror = () => { window.errors += 1; };
  source.addEventListener("token", (e) => window.seen.push(JSON.parse(e.data).index));
  source.addEventListener("done", (e) => { window.done = JSON.parse(e.data); source.close(); });
})();
</script>"""


class PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def test_a_page_of_another_origin_streams_a_request_and_resumes_it_after_an_api_restart(
        fleet: tuple[Stack, dict[str, Any]], browser: Any) -> None:
    _, running = fleet
    site = ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{site.server_address[1]}"
    try:
        api = ApiProcess(running["settings"].replace(cors_origins=origin)).start()
        running["apis"] = [api]
        key = admin("POST", api, "/v1/admin/keys", {"tenant": "acme"})["key"]
        rid = submit(api, key, "chat-1", max_tokens=300)  # 7.5 s at 40 tokens/s: it outlives the restart
        page = browser.new_page()
        page.goto(f"{origin}/?api={api.base_url}&key={key}&rid={rid}")
        page.wait_for_function("() => window.seen.length >= 30", timeout=10000)
        api.restart()
        page.wait_for_function("() => window.done !== null", timeout=30000)
        seen = page.evaluate("window.seen")
        assert seen == list(range(300)), "lost or doubled token indices"
        opens = page.evaluate("window.opens")
        assert len(opens) == 2 and 30 <= opens[1] < 300, opens  # reconnected by itself, mid-generation
        assert page.evaluate("window.done.tokens") == 300
        page.close()
    finally:
        site.shutdown()
        site.server_close()

