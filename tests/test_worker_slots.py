"""Fixed pace: a worker never runs more requests than its --slots, and a group never runs more than
its max_concurrency, however big the burst. Checked from both sides while a burst drains: the
group's running set in Redis (atomic snapshots) and each worker's own count of runs in its engine."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import redis

from sluicegate.sessions import keys
from tests.helpers import Stack, call, fast_settings, submit, wait_for
from tests.worker_helpers import assert_tickets_balanced

# One atomic snapshot: the worker of every running run of a group (its run record names it).
SNAPSHOT = """
local out = {}
for _, key in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local rec = redis.call('HGET', KEYS[2], key)
  out[#out + 1] = rec and cjson.decode(rec).w or '?'
end
return out
"""


class Sampler:
    """Samples running counts in a background thread until stopped; keeps the maxima."""

    def __init__(self, r: redis.Redis, stack: Stack, group: str = "default") -> None:
        self.r, self.stack, self.group = r, stack, group
        self.max_total = 0
        self.max_per_worker: Counter[str] = Counter()
        self.max_executing: Counter[str] = Counter()
        self.max_executing_total = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            running = Counter(self.r.eval(SNAPSHOT, 2, keys.group_key(self.group, "run"),
                                          keys.group_key(self.group, "ri")))
            self.max_total = max(self.max_total, sum(running.values()))
            for wid, n in running.items():
                self.max_per_worker[wid] = max(self.max_per_worker[wid], n)
            executing = {wid: len(w.executing) for wid, w in list(self.stack.workers.items())}
            for wid, n in executing.items():
                self.max_executing[wid] = max(self.max_executing[wid], n)
            self.max_executing_total = max(self.max_executing_total, sum(executing.values()))
            self.samples += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def burst(base: str, n: int, max_tokens: int) -> list[str]:
    return [submit(base, f"burst{i}", prompt=f"p{i}", max_tokens=max_tokens) for i in range(n)]


def drained(base: str, rids: list[str], max_tokens: int) -> None:
    def all_done() -> bool:
        views = [call("GET", f"{base}/v1/requests/{rid}")[1] for rid in rids]
        assert all(v["status"] in ("queued", "running", "done") for v in views), views
        return all(v["status"] == "done" and v["tokens"] == max_tokens for v in views)

    wait_for(all_done, timeout=60, interval=0.2, what="the burst to drain")


def test_a_worker_never_runs_more_than_its_slots(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, sim_tokens_per_second=300.0)).start(workers=0)
    try:
        workers = [stack.add_worker(slots=3) for _ in range(2)]
        sampler = Sampler(r, stack)
        rids = burst(stack.base_url, 50, 30)
        drained(stack.base_url, rids, 30)
        sampler.stop()
        print(f"\n{sampler.samples} samples: running max {sampler.max_total}, per worker "
              f"{dict(sampler.max_per_worker)}, executing {dict(sampler.max_executing)}")
        assert set(sampler.max_per_worker) == set(workers)
        assert max(sampler.max_per_worker.values()) <= 3 and max(sampler.max_executing.values()) <= 3
        assert sampler.max_total == 6  # the burst did fill every slot, and never more
        assert_tickets_balanced(r, expected_slots=6)
    finally:
        stack.stop()


def test_a_group_never_runs_more_than_its_max_concurrency(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, sim_tokens_per_second=300.0)).start(workers=0)
    try:
        for _ in range(2):
            stack.add_worker(slots=3)
        code, reply = call("PUT", f"{stack.base_url}/v1/admin/groups/default", {"max_concurrency": 4})
        assert code == 200, reply
        sampler = Sampler(r, stack)
        rids = burst(stack.base_url, 30, 30)
        drained(stack.base_url, rids, 30)
        sampler.stop()
        print(f"\n{sampler.samples} samples: running max {sampler.max_total}, executing max "
              f"{sampler.max_executing_total}")
        assert sampler.max_total == 4 and sampler.max_executing_total <= 4
        assert max(sampler.max_executing.values()) <= 3
        assert_tickets_balanced(r, expected_slots=6)  # the two slots the cap kept idle are still offered
    finally:
        stack.stop()


class FailsAtItsEnd:
    """A sim engine that raises what no engine wraps (an adapter's bug) after its last token, while the
    writer's appends of those tokens are on their way."""

    def __init__(self) -> None:
        from sluicegate.workers.engines.sim import SimEngine

        self.inner = SimEngine(tokens_per_second=200.0, prefill_ms=0.0)

    def stream(self, run: Any, so_far: str) -> AsyncIterator[str]:
        return self._stream(run, so_far)

    async def _stream(self, run: Any, so_far: str) -> AsyncIterator[str]:
        async for token in self.inner.stream(run, so_far):
            yield token
        raise RuntimeError("an adapter's bug")

    async def aclose(self) -> None:
        pass


def test_a_run_that_fails_mid_append_ends_and_gives_its_slot_back(redis_url: str, r: redis.Redis) -> None:
    """The run's end cancels its writer, mid-append: on a cluster that cancel was lost (redis-py's cluster
    client returned the append normally), the writer waited for tokens for good, and the request stayed
    `running` with its slot held and its lease renewed. It ends failed, and the slot comes back."""
    stack = Stack(fast_settings(redis_url, slots=2)).start(workers=0)
    try:
        stack.add_worker(engine=FailsAtItsEnd())
        rid = submit(stack.base_url, "fails-at-end", prompt="b", max_tokens=40)
        assert wait_for(lambda: call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "failed",
                        timeout=15), call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]
        assert_tickets_balanced(r, expected_slots=2)
    finally:
        stack.stop()
