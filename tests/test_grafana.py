"""The Grafana dashboard (deploy/grafana/sluicegate.json) queries only what /metrics exports, and every
panel shows data from a real Prometheus scraping a running stack (skipped without a `prometheus`
binary: `apt-get install prometheus`, which .ci/run does where it can)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sluicegate.embedded import free_port
from tests.helpers import ROOT, Stack, call, fast_settings, submit, wait_for
from tests.metrics_helpers import wait_done

DASHBOARD = Path(ROOT) / "deploy" / "grafana" / "sluicegate.json"
METRIC = re.compile(r"\bsluicegate_[a-z0-9_]+")
# What Grafana puts in place of its interval variables and of the template variables ("All": .*)
INTERVALS = re.compile(r"\$(__rate_interval|__interval|interval|__range)\b|\$\{(__rate_interval|__interval|interval)\}")
TEMPLATE = re.compile(r"\$\{?(group|tenant)\}?")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_targets(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel, rows included."""
    panels = list(board["panels"])
    for panel in board["panels"]:
        panels.extend(panel.get("panels", []))
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", []) if t.get("expr")]


def concrete(expr: str) -> str:
    return TEMPLATE.sub(".*", INTERVALS.sub("10s", expr))


def exported_names(text: str) -> set[str]:
    """Every series name /metrics exports (from its TYPE lines, so a metric with no sample yet counts)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {"histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}}.get(kind, {name})
    return names


def test_the_dashboard_queries_only_exported_metrics(stack: Stack) -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] == "sluicegate"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    targets = panel_targets(board)
    assert len(targets) >= 10
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    with urllib.request.urlopen(f"{stack.base_url}/metrics", timeout=10) as response:
        exported = exported_names(response.read().decode())
    queried = set(METRIC.findall(json.dumps([expr for _, expr in targets])))
    queried |= set(METRIC.findall(json.dumps([v.get("definition", "") for v in variables.values()])))
    assert queried and queried <= exported, f"queried but not exported: {sorted(queried - exported)}"


def prometheus_query(base: str, query: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        reply = json.load(response)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def start_prometheus(binary: str, target: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      "scrape_configs:\n  - job_name: sluicegate\n    metrics_path: /metrics\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def run_load(base: str) -> None:
    """A few tenants and priorities through a requests/s quota (throttled decisions) and one slot taken
    from a low request by a critical one (a preemption)."""
    assert call("PUT", f"{base}/v1/admin/groups/default", {"requests_per_second": 20, "burst": 2,
                                                           "tokens_per_second": 100000})[0] == 200
    assert call("PUT", f"{base}/v1/admin/tenants/acme", {"weight": 2})[0] == 200
    rids = [submit(base, f"long-{i}", tenant="batch", priority="low", max_tokens=300) for i in range(2)]
    for i in range(12):
        rids.append(submit(base, f"s{i}", tenant=("acme", "globex", "initech")[i % 3],
                           priority=("low", "normal", "high")[i % 3], max_tokens=20 + 5 * i))
    rids.append(submit(base, "urgent", tenant="acme", priority="critical", max_tokens=10))
    wait_done(base, rids, timeout=40)


@pytest.mark.timeout(90)
def test_every_panel_shows_data_from_a_real_prometheus(redis_url: str, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no `prometheus` binary on PATH (apt-get install prometheus): the dashboard's queries are "
                    "checked against /metrics only")
    # 2 worker slots at 200 tokens/s: the two long low requests hold them, so the critical one preempts
    stack = Stack(fast_settings(redis_url, slots=2, sim_tokens_per_second=200.0)).start(workers=1)
    proc, prometheus = start_prometheus(binary, stack.base_url.removeprefix("http://"), tmp_path)
    try:
        wait_for(lambda: _up(prometheus), timeout=20, interval=0.2, what="Prometheus to scrape the API")
        run_load(stack.base_url)
        time.sleep(2.5)  # a few more scrapes, so every rate() has two samples of the final counters
        empty = [(title, expr) for title, expr in panel_targets(dashboard())
                 if not prometheus_query(prometheus, concrete(expr))]
        assert not empty, f"panels without data: {empty}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stack.stop()


def _up(prometheus: str) -> bool:
    try:
        return any(r["value"][1] == "1" for r in prometheus_query(prometheus, 'up{job="sluicegate"}'))
    except OSError:
        return False
