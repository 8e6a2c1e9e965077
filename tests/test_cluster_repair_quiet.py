"""The repair pass counts (and the scheduler logs as a WARNING) only the half-done transitions it completed.
A head whose submit readied it stays in its bucket's outbox (the submit does not confirm it), so a head that
waits longer than the pass's age for a slot is read again; the control plane answers its ready with a
confirmation ("known"), which is nothing completed: counted, an operator would read crashing callers."""

from __future__ import annotations

import pytest
import redis

from sluicegate.sessions import keys
from sluicegate.sessions.transitions import run_sync
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness

pytestmark = pytest.mark.skipif(not ON_CLUSTER, reason="cluster only (SLUICEGATE_TEST_CLUSTER=1)")


def test_heads_that_only_wait_for_a_slot_are_not_counted_as_repaired(r: redis.Redis) -> None:
    h = Harness(r, cluster=True)
    h.add_worker("w", slots=1)
    rids = [h.submit(f"s{i}") for i in range(4)]  # every submit's ready call succeeded
    assert h.running() == rids[:1]
    assert [h.waiting_rid(f"s{i}") for i in range(1, 4)] == rids[1:]  # ready on the control plane
    buckets = [keys.bucket_of_session(f"s{i}") for i in range(1, 4)]
    assert all(r.zscore(keys.outbox(b), rid) is not None for b, rid in zip(buckets, rids[1:], strict=True))
    assert run_sync(h.t.repair(keys.all_buckets(), age_ms=0)) == 0  # [3 before the fix]
    # confirmed, they leave the outbox: the next pass does not read them again
    assert all(r.zscore(keys.outbox(b), rid) is None for b, rid in zip(buckets, rids[1:], strict=True))
    assert [h.waiting_rid(f"s{i}") for i in range(1, 4)] == rids[1:]  # and still wait, once each
    assert h.running() == rids[:1]
