"""The dashboard review's fixes (api/dashboard_routes.py, api/static/dashboard.html):

1. a worker whose backend is down shows so (its state, "0 of N" slots, the Workers card, its group's state);
   it showed as a healthy worker offering all its slots, in a group "ok";
2. a store outage answers the stats stream's opening 503 (the page's back-off applies) and ends a stream already
   open with an `unavailable` event, no traceback: it opened 200 and crashed on every tick, logging ERROR
   tracebacks about 8 times a second while the page reconnected every second;
3. a tenant's share and its fair mark on the page are within its group, as the scheduler decides (the stream's
   new `tenant_share_by_group`): they were fleet-wide (`tenant_share`, kept as it was for other readers),
   calling two groups of different capacity unfair when each was exactly fair;
4. an admin key an HTTP header cannot carry (a pasted zero-width space) asks for the key again: it left the
   tab at "offline, retrying" for good, with no form, even after a reload;
5. submitting the key form twice opens one EventSource, not two.

The browser tests drive the system's Chromium through Playwright, as tests/test_browser.py does (skipped
without either).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sluicegate.embedded import EmbeddedCluster, EmbeddedServer, free_port
from sluicegate.sessions import keys
from sluicegate.workers import worker as worker_module
from tests.cluster_helpers import start_test_cluster
from tests.helpers import Stack, call, fast_settings, wait_for
from tests.test_stream_tokens import stats_events

ADMIN = "admin-secret"
BEARER = {"authorization": f"Bearer {ADMIN}"}


def open_stream(base: str, path: str, headers: dict[str, str]) -> tuple[http.client.HTTPConnection,
                                                                        http.client.HTTPResponse]:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path, headers=headers)
    return connection, connection.getresponse()


def events_until_end(response: http.client.HTTPResponse, after_first: Any = None) -> list[tuple[str, Any]]:
    """Every event of an SSE answer until the server ends it; `after_first()` is called once the first
    `stats` event was read."""
    seen: list[tuple[str, Any]] = []
    event = ""
    while line := response.readline():
        text = line.decode().rstrip("\n")
        if text.startswith("event: "):
            event = text[7:]
        elif text.startswith("data: "):
            seen.append((event, json.loads(text[6:])))
            if after_first is not None and event == "stats":
                after_first()
                after_first = None
    return seen


class Collected(logging.Handler):
    """Records at WARNING and above, from the sluicegate loggers and uvicorn's (which does not propagate)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.fixture
def logged() -> Iterator[Collected]:
    handler = Collected()
    watched = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
    for logger in watched:
        logger.addHandler(handler)
    yield handler
    for logger in watched:
        logger.removeHandler(handler)


def api_alone_on(store: EmbeddedServer | EmbeddedCluster) -> Iterator[tuple[EmbeddedServer | EmbeddedCluster, Stack]]:
    """The API alone on a store of the test's own (auth on), which the test stops: nothing else runs on it to
    log its own errors while it is down."""
    stack = Stack(fast_settings(store.url, auth=True, admin_key=ADMIN, redis_cluster=store.cluster)).start(
        scheduler=False, workers=0)
    yield store, stack
    stack.stop()
    store.stop()


@pytest.fixture
def own_store(tmp_path: Path) -> Iterator[tuple[EmbeddedServer | EmbeddedCluster, Stack]]:
    server = EmbeddedServer(data_dir=str(tmp_path / "store"), port=free_port(), persistent=False)
    yield from api_alone_on(server.start())


# ---- 2. a store outage, on the server ----------------------------------------------------------------------

@pytest.mark.own_servers  # it stops its store: the shared one (or cluster) stays up for the other tests
def test_a_store_outage_answers_the_stats_streams_opening_503(own_store: tuple[EmbeddedServer, Stack],
                                                               logged: Collected) -> None:
    server, stack = own_store
    assert next(stats_events(stack.base_url, "/v1/admin/stats/stream", 1, BEARER))["workers"] == []
    server.stop()
    for _ in range(3):  # each attempt a 503 JSON error, as every other route answers
        connection, response = open_stream(stack.base_url, "/v1/admin/stats/stream", BEARER)
        try:
            assert response.status == 503, response.getheaders()  # old: 200, then the stream broke off
            body = response.read()
        finally:
            connection.close()
        assert response.getheader("retry-after") == "1"
        assert "Redis" in json.loads(body)["error"]["message"]
    assert logged.tracebacks() == []


@pytest.fixture
def own_cluster_store(tmp_path: Path) -> Iterator[tuple[EmbeddedServer | EmbeddedCluster, Stack]]:
    """own_store's cluster: the cluster client fails otherwise (RedisClusterException, no RedisError)."""
    yield from api_alone_on(start_test_cluster(tmp_path / "cluster"))


@pytest.mark.own_servers  # it stops its store: the shared one (or cluster) stays up for the other tests
@pytest.mark.parametrize("store", ["own_store", "own_cluster_store"])
def test_a_store_failure_mid_stream_ends_the_stream_quietly(store: str, request: pytest.FixtureRequest,
                                                            logged: Collected) -> None:
    server, stack = request.getfixturevalue(store)
    connection, response = open_stream(stack.base_url, "/v1/admin/stats/stream?interval=0.2", BEARER)
    try:
        assert response.status == 200
        seen = events_until_end(response, after_first=server.stop)  # returns: the server ended the stream
    finally:
        connection.close()
    assert logged.tracebacks() == []  # old: "unhandled error" (an ExceptionGroup), "response already started"
    assert seen[0][0] == "stats" and seen[-1][0] == "unavailable", [event for event, _ in seen]
    assert "unavailable" in seen[-1][1]["message"]
    assert any("stats stream ended" in r.getMessage() for r in logged.records)  # one warning line says why


# ---- 3. shares within each group ---------------------------------------------------------------------------

def test_each_tenants_share_and_fair_mark_are_within_its_group(stack: Stack, r: redis.Redis) -> None:
    """Two groups of different capacity, each exactly fair: `big` serves a (weight 3) 900 tokens/s beside c
    (weight 1, queued, none served), `small` serves b (weight 1) alone 100 tokens/s. Counters written as the
    data plane writes them (sessions/lua/includes/metrics.lua): one interval's worth."""
    base = stack.base_url
    for group in ("big", "small"):
        assert call("PUT", f"{base}/v1/admin/groups/{group}", {})[0] == 200
    assert call("PUT", f"{base}/v1/admin/tenants/a", {"weight": 3})[0] == 200
    metrics = keys.data_metrics(keys.all_buckets()[0])
    r.hincrby(metrics, "depth|big|5|c", 2)
    events = stats_events(base, "/v1/admin/stats/stream?interval=1", 2)
    next(events)
    r.hincrby(metrics, "tokens|big|5|a", 900)
    r.hincrby(metrics, "tokens|small|5|b", 100)
    second = next(events)
    events.close()
    shares = {(group, s["tenant"]): s for group, entries in second["tenant_share_by_group"].items() for s in entries}
    assert list(shares) == [("big", "a"), ("big", "c"), ("small", "b")]  # old: no tenant_share_by_group
    assert (shares[("big", "a")]["weight_share"], shares[("big", "a")]["token_share"]) == (0.75, 1.0)
    assert (shares[("big", "c")]["weight_share"], shares[("big", "c")]["token_share"]) == (0.25, 0.0)
    assert shares[("big", "c")]["queued"] == 2
    assert (shares[("small", "b")]["weight_share"], shares[("small", "b")]["token_share"]) == (1.0, 1.0)
    # The fleet-wide figures stay as they were, for the stream's other readers (a: 900 of 1000 tokens/s)
    fleet = {s["tenant"]: s for s in second["tenant_share"]}
    assert sorted(fleet) == ["a", "b", "c"] and fleet["a"]["token_share"] == 0.9 and fleet["a"]["weight_share"] == 0.6
    assert set(second["tokens_per_second"]) == {"total", "by_group", "by_tenant"}


# ---- the page, in Chromium ----------------------------------------------------------------------------------

CHROMIUM = os.environ.get("SLUICEGATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the `test` extra)")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium): browser tests skipped")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def secured(redis_url: str) -> Iterator[Stack]:
    stack = Stack(fast_settings(redis_url, auth=True, admin_key=ADMIN)).start(workers=1)
    yield stack
    stack.stop()


def live_page(browser: Any, base: str) -> Any:
    """The dashboard, past its key form, showing at least one update."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{base}/dashboard")
    page.wait_for_selector("#keyform:not([hidden])")
    page.fill("#key", ADMIN)
    page.click("#keyform button[type=submit]")
    page.wait_for_function("() => window.sluicegate.updates > 0", timeout=10000)
    return page


def test_a_worker_whose_backend_is_down_shows_down_with_no_slots(redis_url: str, browser: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's case: an `openai` worker whose backend port is closed, 3 requests; the worker withdraws
    its slots (`"backend": "down"` in /v1/admin/stats) and the requests wait queued."""
    monkeypatch.setattr(worker_module, "PROBE_RETRY_SECONDS", 600.0)  # it stays withdrawn for the test
    settings = fast_settings(redis_url, auth=True, admin_key=ADMIN, engine="openai", backend_model="m",
                             backend_url=f"http://127.0.0.1:{free_port()}/v1", backend_retries=1, slots=4)
    stack = Stack(settings).start(workers=1)
    try:
        key = call("POST", f"{stack.base_url}/v1/admin/keys", {"tenant": "acme"}, headers=BEARER)[1]["key"]
        for i in range(3):
            code, reply = call("POST", f"{stack.base_url}/v1/sessions/s{i}/requests", {"prompt": "hi", "max_tokens": 5},
                               headers={"authorization": f"Bearer {key}"})
            assert code == 202, reply

        def withdrawn() -> bool:
            stats = call("GET", f"{stack.base_url}/v1/admin/stats", headers=BEARER)[1]
            return stats["workers"][0].get("backend") == "down" and stats["queued"] == 3

        wait_for(withdrawn, timeout=20, what="the worker to withdraw its slots")
        page = live_page(browser, stack.base_url)
        page.wait_for_function("() => window.sluicegate.last.queued === 3", timeout=10000)
        workers = [line.split("\t") for line in page.inner_text("#workers").splitlines()[1:]]
        assert len(workers) == 1 and workers[0][3:] == ["0 of 4", "backend down (no slots offered)"], workers
        assert page.inner_text("#workers-count") == "1 (1 down)"
        groups = {line.split("\t")[0]: line.split("\t") for line in page.inner_text("#groups").splitlines()}
        assert groups["default"][-1] == "backend down on 1 of 1 workers", groups["default"]
        tenants = [line.split("\t")[0] for line in page.inner_text("#tenants").splitlines()]
        assert tenants[1:3] == ["group default", "acme"], tenants  # shares shown per group (finding 3)
        page.close()
    finally:
        stack.stop()


def test_a_key_a_header_cannot_carry_asks_for_the_key_again(secured: Stack, browser: Any) -> None:
    page = browser.new_page()
    page.goto(f"{secured.base_url}/dashboard")
    page.wait_for_selector("#keyform:not([hidden])")
    page.fill("#key", ADMIN + "\u200b")  # a zero-width space, pasted with the key
    page.click("#keyform button[type=submit]")
    page.wait_for_function("() => document.getElementById('keyerror').textContent.includes('header') || "
                           "document.getElementById('status').textContent === 'offline, retrying'", timeout=5000)
    assert page.inner_text("#status") == "needs the admin key"  # old: "offline, retrying", for good
    assert "header" in page.inner_text("#keyerror")
    assert page.evaluate("sessionStorage.getItem('sluicegate.adminKey')") is None
    # Such a key already stored (an older page kept it): a reload asks for the key, and a good one goes live
    page.evaluate("sessionStorage.setItem('sluicegate.adminKey', 'admin-secret\u2019')")
    page.reload()
    page.wait_for_selector("#keyform:not([hidden])", timeout=5000)
    assert "header" in page.inner_text("#keyerror")
    page.fill("#key", ADMIN)
    page.click("#keyform button[type=submit]")
    page.wait_for_function("() => window.sluicegate.updates > 0", timeout=10000)
    assert page.inner_text("#status") == "live" and page.evaluate("document.getElementById('keyform').hidden")
    page.close()


def test_submitting_the_key_form_twice_opens_one_stream(secured: Stack, browser: Any) -> None:
    page = browser.new_page()
    page.goto(f"{secured.base_url}/dashboard")
    page.wait_for_selector("#keyform:not([hidden])")
    page.fill("#key", ADMIN)
    page.evaluate("""() => {
        const form = document.getElementById('keyform');
        form.requestSubmit();
        document.getElementById('key').value = 'admin-secret';
        form.requestSubmit();
    }""")
    page.wait_for_function("() => window.sluicegate.updates >= 4", timeout=10000)
    assert page.evaluate("[window.sluicegate.sources, window.sluicegate.opens]") == [1, 1]
    page.close()


@pytest.mark.own_servers  # it stops its store and starts it again
def test_the_page_backs_off_while_the_store_is_down_and_comes_back_with_it(
        own_store: tuple[EmbeddedServer, Stack], browser: Any, logged: Collected, tmp_path: Path) -> None:
    server, stack = own_store
    page = live_page(browser, stack.base_url)
    assert page.evaluate("window.sluicegate.opens") == 1
    server.stop()
    # The page's own retries while the store stays down (1 s, 2 s, 4 s): every reopening is refused (503),
    # none opens (old: each reopening opened, 200, and reset the back-off), and nothing logs a traceback.
    wait_for(lambda: page.evaluate("window.sluicegate.sources >= 3 || window.sluicegate.opens > 1"), timeout=20,
             interval=0.2, what="the page's retries")
    assert page.evaluate("window.sluicegate.opens") == 1
    assert logged.tracebacks() == []
    assert page.inner_text("#status") == "store unreachable, retrying"
    # The store back on its port: the next retry goes live again
    again = EmbeddedServer(data_dir=str(tmp_path / "store"), port=server.port, persistent=False).start()
    try:
        updates = page.evaluate("window.sluicegate.updates")
        page.wait_for_function(f"() => window.sluicegate.updates > {updates}", timeout=30000)
        assert page.inner_text("#status") == "live"
        page.close()
    finally:
        again.stop()
