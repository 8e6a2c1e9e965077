"""The locustfile runs headless against a live stack with zero failures while its reconnecting users
verify streams, and its verifier really fails a stream with a gap or a duplicate.

Locust monkey-patches the standard library with gevent when imported, so it only ever runs in a
subprocess here, never inside the pytest process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from tests.helpers import ROOT, Stack

# find_spec, not importorskip: importing locust here would patch this process's threads with gevent
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (the `load` extra)", allow_module_level=True)

LOCUSTFILE = os.path.join(ROOT, "loadtest", "locustfile.py")


def run_locust(host: str, tmp_path: Path, *, users: int, seconds: int) -> tuple[dict[str, dict], dict, str]:
    env = {**os.environ, "SG_TENANTS": "3", "SG_GROUPS": "default", "SG_MAX_TOKENS": "8-24",
           "SG_THINK": "0.02-0.2", "SG_OPERATOR_EVERY": "1", "SG_DROPS": "1-3"}
    stats_file = tmp_path / "stats"
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--headless", "-u", str(users), "-r", str(users),
         "-t", f"{seconds}s", "--stop-timeout", "10", "--host", host, "--only-summary", "--skip-log",
         "--json-file", str(stats_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 60)
    output = proc.stdout + proc.stderr
    summary_lines = [line for line in proc.stdout.splitlines() if line.startswith("sluicegate-locust: ")]
    assert summary_lines, output[-3000:]
    summary = json.loads(summary_lines[-1].removeprefix("sluicegate-locust: "))
    path = stats_file if stats_file.exists() else stats_file.with_suffix(".json")
    entries = {f"{e['method']} {e['name']}": e for e in json.loads(path.read_text())}
    return entries, summary, output


def test_locust_runs_clean_and_verifies_resumed_streams(stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    entries, summary, output = run_locust(stack.base_url, tmp_path, users=8, seconds=12)
    failures = {name: e["num_failures"] for name, e in entries.items() if e["num_failures"]}
    assert not failures, (failures, output[-3000:])
    assert summary["total_failures"] == 0 and summary["resume_failures"] == 0, summary
    # Reconnecting users checked whole streams across drops, and really reconnected.
    assert summary["resume_verified"] >= 5, summary
    assert entries["SSE resume_first_event"]["num_requests"] >= 5
    # Chat users streamed and reported their own TTFT and inter-token entries.
    assert summary["streams"] >= 5, summary
    assert entries["SSE ttft"]["num_requests"] == entries["SSE stream"]["num_requests"]
    assert entries["SSE inter_token_gap"]["num_requests"] > entries["SSE ttft"]["num_requests"]
    # The operator changed weights and quotas and put permissive values back at the end.
    assert entries["PUT /v1/admin/tenants/[tenant]"]["num_requests"] > 0
    assert entries["PUT /v1/admin/groups/[group]"]["num_requests"] > 0
    assert r.hgetall("sg:{g:default}:cfg") == {}
    assert set(r.hvals("sg:tenants")) <= {"1.0"}


def test_verifier_fails_gaps_duplicates_and_reordered_ids() -> None:
    """The verifier is what turns a broken stream into a reported failure; prove it rejects each case."""
    script = textwrap.dedent("""
        import json
        from sluicegate.loadtest.locustfile import SseEvent, StreamBroken, Verifier

        def tok(i, idx, rid="r1"):
            return SseEvent(i, "token", {"request_id": rid, "index": idx}, 0.0)

        def done(i, n):
            return SseEvent(i, "done", {"request_id": "r1", "tokens": n}, 0.0)

        cases = {
            "ok": [tok(2, 0), tok(3, 1), SseEvent(4, "preempted", {"request_id": "r1"}, 0.0), tok(6, 2), done(7, 3)],
            "gap": [tok(2, 0), tok(3, 2)],
            "duplicate": [tok(2, 0), tok(3, 1), tok(4, 1)],
            "replayed_id": [tok(2, 0), tok(3, 1), tok(3, 1)],
            "short_done": [tok(2, 0), done(3, 2)],
            "error": [tok(2, 0), SseEvent(3, "error", {"request_id": "r1"}, 0.0)],
            "other_request_ok": [tok(2, 0), tok(3, 0, "r2"), tok(4, 1), done(5, 2)],
        }
        result = {}
        for name, seq in cases.items():
            v = Verifier("r1", 8)
            try:
                for e in seq:
                    v.feed(e)
                result[name] = "ok"
            except StreamBroken as broken:
                result[name] = str(broken)
        print(json.dumps(result))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] == "ok" and result["other_request_ok"] == "ok", result
    assert "gap" in result["gap"]
    assert "duplicate" in result["duplicate"]
    assert "duplicate or reordered" in result["replayed_id"]
    assert "done says 2 tokens, saw 1" in result["short_done"]
    assert "ended with error" in result["error"]


def test_resume_first_event_times_the_reconnect_from_before_its_connect() -> None:
    """`SSE resume_first_event` is a reconnect to its first replayed event: the connect (here 0.5 s on a fake
    clock until the response headers) counts, not only the wait for the first event after them (10 ms)."""
    script = textwrap.dedent("""
        import json, random, types
        from sluicegate.loadtest import locustfile
        from sluicegate.loadtest.locustfile import ResumeUser, SseEvent

        clock = [0.0]
        locustfile.time = types.SimpleNamespace(perf_counter=lambda: clock[0])
        events = [(1, "token", {"request_id": "r1", "index": 0}), (2, "token", {"request_id": "r1", "index": 1}),
                  (3, "token", {"request_id": "r1", "index": 2}), (4, "done", {"request_id": "r1", "tokens": 3})]

        class Stream:
            def __init__(self, after):
                self.after = after

            def events(self):
                for i, name, data in events:
                    if self.after is None or i > self.after:
                        clock[0] += 0.010  # 10 ms after the headers, or after the event before
                        yield SseEvent(i, name, data, clock[0])

            def drop(self):
                pass

        def connect(sid, rid, last_id, session_form):
            clock[0] += 0.5  # the reconnect's TCP connect and response headers
            return Stream(last_id)

        user = object.__new__(ResumeUser)
        timings, reports = [], []
        user.__dict__.update(cfg=types.SimpleNamespace(drops=(1, 1)), rng=random.Random(3),
                             submit=lambda: ("s1", "r1", {"max_tokens": 3}), _connect=connect,
                             timing=lambda name, ms: timings.append((name, ms)),
                             report=lambda name, started, length=0, error=None: reports.append((name, length, error)))
        user.chat_with_drops()
        print(json.dumps({"timings": timings, "reports": reports}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reports"] == [["resume_verified", 3, None]], result
    assert [name for name, _ in result["timings"]] == ["resume_first_event"], result
    assert result["timings"][0][1] == pytest.approx(510.0), result
