"""The client commands (`sluicegate submit | tail | quota | weight | stats`) as a user runs them: real
processes against a real stack. `tail` resumes across an API restart; quota and weight change what the
admin routes report; --json is one JSON document per line."""

from __future__ import annotations

import json
import os
import pty
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from sluicegate.client import Client
from tests.client_helpers import restartable_stack
from tests.helpers import ROOT, Stack, call, fast_settings


def sg(*args: str, url: str, timeout: float = 30, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLUICEGATE_URL": url}
    env.pop("SLUICEGATE_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "sluicegate", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, input=stdin)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def output_of(url: str, request_id: str) -> str:
    with Client(url) as client:
        return "".join(e.text for e in client.stream(request_id=request_id) if e.event == "token")


def test_submit_prints_the_id_and_follow_prints_the_text(stack: Stack) -> None:
    url = stack.base_url
    done = sg("submit", "cli-1", "hello", "--max-tokens", "4", "--priority", "high", "--tenant", "acme", url=url)
    assert done.returncode == 0, done.stderr
    request_id = done.stdout.strip()
    info = call("GET", f"{url}/v1/requests/{request_id}")[1]
    assert (info["session_id"], info["priority"], info["tenant"], info["max_tokens"]) == ("cli-1", 7, "acme", 4)
    followed = sg("submit", "cli-1", "tell me more", "--max-tokens", "12", "--follow", url=url)
    assert followed.returncode == 0, followed.stderr
    followed_id = followed.stderr.splitlines()[0].strip()  # the id goes to stderr: stdout is the text alone
    assert followed.stdout == output_of(url, followed_id) + "\n" and len(followed.stdout) > 12
    piped = sg("submit", "cli-1", "-", "--max-tokens", "3", "--follow", "--group", "default", url=url,
               stdin="a prompt from stdin")
    assert piped.returncode == 0 and piped.stdout.strip()


def test_json_lines_parse(stack: Stack) -> None:
    result = sg("submit", "cli-json", "hello", "--max-tokens", "5", "--follow", "--json", url=stack.base_url)
    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stdout)
    assert lines[0]["status"] == "queued" and lines[0]["session_id"] == "cli-json"
    events = lines[1:]
    assert [e["event"] for e in events][0] == "queued" and events[-1]["event"] == "done"
    assert [e["data"]["index"] for e in events if e["event"] == "token"] == list(range(5))
    assert all(e["data"]["request_id"] == lines[0]["request_id"] for e in events)
    after = events[2]["id"]
    tail = subprocess.Popen([sys.executable, "-m", "sluicegate", "tail", "cli-json", "--after", str(after), "--json",
                             "--url", stack.base_url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert tail.stdout is not None
        assert [json.loads(tail.stdout.readline()) for _ in events[3:]] == events[3:]
    finally:
        tail.kill()
        tail.wait()


def test_errors_are_one_line_and_exit_1(stack: Stack) -> None:
    result = sg("submit", "cli-err", "x", "--group", "no-such-group", url=stack.base_url)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("sluicegate submit: 404 unknown_group: ") and len(result.stderr.splitlines()) == 1
    result = sg("stats", url="http://127.0.0.1:9")  # nothing listens on the discard port
    assert result.returncode == 1 and "unreachable" in result.stderr
    assert sg("quota", "default", "--burst", "many", url=stack.base_url).returncode != 0


def test_tail_resumes_across_an_api_restart(redis_url: str) -> None:
    settings = fast_settings(redis_url, sim_tokens_per_second=60.0)
    with restartable_stack(settings) as api:
        proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "tail", "cli-tail", "--json"], cwd=ROOT,
                                env={**os.environ, "SLUICEGATE_URL": api.base_url}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True).start()
        try:
            with Client(api.base_url) as client:
                first = client.submit("cli-tail", "one", max_tokens=5)
                second = client.submit("cli-tail", "two", max_tokens=120)
            events: list[dict[str, Any]] = []
            restarted = None
            deadline = time.monotonic() + 40
            while not (events and events[-1]["event"] == "done" and events[-1]["data"]["request_id"]
                       == second.request_id):
                events.append(json.loads(lines.get(timeout=max(0.1, deadline - time.monotonic()))))
                if events[-1]["data"].get("index") == 40 and events[-1]["data"]["request_id"] == second.request_id:
                    restarted = api.restart_in_background(signal.SIGKILL, down_for=0.5)
            assert restarted is not None
            restarted.join(30)
        finally:
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=10)
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids))
        for request_id, n in ((first.request_id, 5), (second.request_id, 120)):
            mine = [e for e in events if e["data"]["request_id"] == request_id]
            assert [e["data"]["index"] for e in mine if e["event"] == "token"] == list(range(n))
            assert mine[-1]["event"] == "done"
        assert "reconnecting" in stderr and proc.returncode == 130


def test_tail_human_lines(stack: Stack) -> None:
    with Client(stack.base_url) as client:
        sent = client.submit("cli-human", "hi", max_tokens=2)
        list(client.stream(request_id=sent.request_id))
    proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "tail", "cli-human", "--url", stack.base_url],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().split() for _ in range(5)]
    finally:
        proc.kill()
        proc.wait()
    assert [line[1] for line in lines] == ["queued", "started", "token", "token", "done"]
    assert all(line[2] == sent.request_id for line in lines) and lines[2][3] == "#0"
    assert "tokens=2" in lines[4]


def test_quota_and_weight_change_what_admin_reports(stack: Stack) -> None:
    url = stack.base_url
    result = sg("quota", "default", "--requests-per-second", "10", "--burst", "5", "--max-concurrency", "3", url=url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "group default: requests_per_second=10 burst=5 max_concurrency=3"
    groups = {g["group"]: g["quota"] for g in call("GET", f"{url}/v1/admin/groups")[1]["groups"]}
    assert groups["default"] == {"requests_per_second": 10, "burst": 5, "max_concurrency": 3}
    cleared = sg("quota", "default", "--burst", "none", "--json", url=url)
    assert json_lines(cleared.stdout)[0]["quota"] == {"requests_per_second": 10, "max_concurrency": 3}
    assert sg("quota", "default", url=url).stdout.strip() == \
        "group default: requests_per_second=10 max_concurrency=3"
    result = sg("weight", "acme", "3", url=url)
    assert result.returncode == 0 and result.stdout.strip() == "tenant acme: weight 3.0"
    tenants = {t["tenant"]: t["weight"] for t in call("GET", f"{url}/v1/admin/tenants")[1]["tenants"]}
    assert tenants["acme"] == 3.0
    assert json_lines(sg("weight", "acme", "0.5", "--json", url=url).stdout)[0]["weight"] == 0.5
    stats = call("GET", f"{url}/v1/admin/stats")[1]
    assert next(g for g in stats["groups"] if g["group"] == "default")["quota"]["max_concurrency"] == 3
    assert {t["tenant"]: t["weight"] for t in stats["tenants"]}["acme"] == 0.5


def test_stats_prints(stack: Stack) -> None:
    url = stack.base_url
    sg("weight", "acme", "2", url=url)
    human = sg("stats", url=url)
    assert human.returncode == 0, human.stderr
    worker_id = next(iter(stack.workers))
    for text in ("queued 0", "running 0", "workers 1", "groups", "default", worker_id, "tenants", "acme"):
        assert text in human.stdout, (text, human.stdout)
    document = json_lines(sg("stats", "--json", url=url).stdout)[0]
    assert document["workers"][0]["worker_id"] == worker_id
    watch = subprocess.Popen([sys.executable, "-m", "sluicegate", "stats", "--watch", "--json", "--interval", "0.2",
                              "--url", url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        assert all("queued" in json.loads(watch.stdout.readline()) for _ in range(3))
    finally:
        watch.kill()
        watch.wait()
    piped = subprocess.Popen([sys.executable, "-m", "sluicegate", "stats", "--watch", "--interval", "0.2", "--url",
                              url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert piped.stdout is not None  # not a terminal: one snapshot after another
        assert all(piped.stdout.readline() for _ in range(40))
    finally:
        piped.kill()
        piped.wait()


def test_stats_watch_redraws_a_live_table_on_a_terminal(stack: Stack) -> None:
    """On a terminal `stats --watch` redraws its table in place (rich Live), until Ctrl-C."""
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "stats", "--watch", "--interval", "0.2", "--url",
                             stack.base_url], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=child, stderr=child,
                            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "50"})
    os.close(child)
    worker_id = next(iter(stack.workers))
    seen = b""
    try:
        deadline = time.monotonic() + 20
        while seen.count(worker_id.encode()) < 3 and time.monotonic() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                seen += os.read(main, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    assert seen.count(worker_id.encode()) >= 3, seen[-2000:]
    assert b"\x1b[" in seen  # redrawn in place with cursor moves, not printed again and again
