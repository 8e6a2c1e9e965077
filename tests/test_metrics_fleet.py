"""/metrics is fleet-wide: every counter and gauge is read from Redis, so any API process reports the
same numbers (a scrape of any replica, or of the load balancer, is complete); tenant labels are
bounded to --metrics-max-tenants tenants plus "~other", with every total kept."""

from __future__ import annotations

import redis

from sluicegate.api.metrics import bounded, top_tenants
from sluicegate.embedded import free_port
from tests.helpers import Stack, call, fast_settings, spawn, stop_process, submit, wait_for
from tests.metrics_helpers import raw_depths, scrape, series, tenants, total, wait_done


def test_two_api_processes_report_the_same_counters(redis_url: str) -> None:
    settings = fast_settings(redis_url, sim_tokens_per_second=2000.0)
    stack = Stack(settings).start(workers=1)
    port = free_port()
    second = spawn("api", settings.replace(port=port))
    other = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(other), timeout=30, interval=0.1, what="the second API process")
        # a requests/s quota that the burst below runs into: the throttle counter moves too
        quota = {"requests_per_second": 20, "burst": 1}
        assert call("PUT", f"{stack.base_url}/v1/admin/groups/default", quota)[0] == 200
        rids, sizes = [], []
        for i in range(12):
            sizes.append(5 + i)
            rids.append(submit(stack.base_url if i % 2 else other, f"s{i}", tenant=f"t{i % 3}",
                               priority=("low", "normal", "high")[i % 3], max_tokens=5 + i))
        wait_done(stack.base_url, rids)

        def same() -> dict | None:
            mine, theirs = scrape(stack.base_url), scrape(other)  # every sample fleet-wide, open streams too
            return mine if mine == theirs else None

        samples = wait_for(same, timeout=10, interval=0.2, what="both processes to report the same samples")
        assert total(samples, "sluicegate_requests_total", status="submitted") == 12
        assert total(samples, "sluicegate_requests_total", status="done") == 12
        assert total(samples, "sluicegate_tokens_total") == sum(sizes)
        assert tenants(samples, "sluicegate_tokens_total") == {"t0", "t1", "t2"}
        assert total(samples, "sluicegate_quota_throttled_total", group="default", reason="requests_per_second") > 0
        for name in ("sluicegate_request_wait_seconds_count", "sluicegate_time_to_first_token_seconds_count"):
            assert {dict(k)["priority"]: v for k, v in series(samples, name).items()} == {"2": 4, "5": 4, "7": 4}
        assert total(samples, "sluicegate_workers", group="default") == 1
        assert total(samples, "sluicegate_worker_slots", group="default") == 4
        assert total(samples, "sluicegate_free_slots", group="default") == 4
        assert total(samples, "sluicegate_running_requests") == 0
        assert total(samples, "sluicegate_group_quota", group="default", quota="requests_per_second") == 20
    finally:
        stop_process(second)
        stack.stop()


def _healthy(base_url: str) -> bool:
    try:
        return call("GET", f"{base_url}/healthz")[0] == 200
    except OSError:
        return False


def test_tenant_labels_are_the_top_n_plus_other_and_the_sums_are_kept(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, metrics_max_tenants=3, sim_tokens_per_second=2000.0)).start(workers=1)
    try:
        assert call("PUT", f"{stack.base_url}/v1/admin/tenants/t1", {"weight": 3})[0] == 200
        sizes = {f"t{i}": 60 - 10 * i for i in range(6)}  # t0 streams the most tokens, t5 the fewest
        rids = [submit(stack.base_url, f"s-{tenant}", tenant=tenant, max_tokens=n) for tenant, n in sizes.items()]
        wait_done(stack.base_url, rids)
        samples = scrape(stack.base_url)
        for name in ("sluicegate_tokens_total", "sluicegate_requests_total", "sluicegate_queue_depth"):
            assert tenants(samples, name) == {"t0", "t1", "t2", "~other"}, name
        # every request ended: none waits, whether it started in its own submit or waited for a slot
        assert set(series(samples, "sluicegate_queue_depth").values()) == {0.0}
        depths = raw_depths(r, ["default"])
        assert depths and set(depths.values()) == {0.0}, depths
        assert total(samples, "sluicegate_tokens_total") == sum(sizes.values())
        assert total(samples, "sluicegate_tokens_total", tenant="~other") == 30 + 20 + 10
        assert total(samples, "sluicegate_requests_total", tenant="~other", status="done") == 3
        assert total(samples, "sluicegate_requests_total", status="done") == 6
        weights = {dict(k)["tenant"]: v for k, v in series(samples, "sluicegate_tenant_weight").items()}
        assert weights == {"t0": 1.0, "t1": 3.0, "t2": 1.0}
    finally:
        stack.stop()


def test_the_top_tenants_are_ranked_by_tokens_then_requests_then_name() -> None:
    totals = {"tokens": {"g|5|a": 10.0, "g|5|b": 30.0, "g|7|a": 25.0},
              "requests": {"g|5|c|done": 2.0, "g|5|d|done": 2.0, "g|5|e|done": 1.0},
              "depth": {"g|5|f": 1.0}}
    assert top_tenants(totals, 2) == {"a", "b"}  # a: 35 tokens over two priorities
    assert top_tenants(totals, 4) == {"a", "b", "c", "d"}  # c and d: equal, then by name; e and f fewer
    merged = bounded({"g|5|a|done": 1.0, "g|5|x|done": 2.0, "g|5|y|done": 3.0, "g|7|y|done": 4.0}, 2, {"a"})
    assert merged == {"g|5|a|done": 1.0, "g|5|~other|done": 5.0, "g|7|~other|done": 4.0}
