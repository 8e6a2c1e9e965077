"""`bench memory` (loadtest/scenarios/memory.py): its breakdown names every kind of key a queued request
costs, on the key layout in use, and adds up to what the server's used_memory grew by."""

from __future__ import annotations

import argparse

import pytest

from sluicegate.loadtest.scenarios import memory


@pytest.mark.single_server  # a scratch server of its own
def test_the_breakdown_measures_each_own_key_and_accounts_for_the_total(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "write_result", lambda name, result: None)  # keep loadtest/results/ a bench's
    args = argparse.Namespace(requests=400, prompt_chars=100, max_tokens=256, tenants=1, via="store", concurrency=8,
                              sample=50, server_binary=None)
    result = memory.run(args)
    rows = {row["kind"]: row for row in result["breakdown"]}
    own = [label for label, _ in memory.OWN_KEYS]
    for label in own:
        (row,) = [r for kind, r in rows.items() if kind.endswith(label)]
        assert row["bytes_each"] > 40, row  # a key's header alone is more (the old layout's names measured 0.4)
    assert rows["ready specs, one a ready session sg:{g:G}:rq"]["bytes_per_request"] > 50
    total = result["bytes_per_request"]
    unaccounted = rows["allocator, key table, expires (unaccounted)"]["bytes_per_request"]
    assert total > 500 and abs(unaccounted) < 0.3 * total, (total, unaccounted)  # the key table grows in steps
    # the five own keys, and a bucket's metrics hash the first time one of its requests is counted
    assert 5 <= result["keys_per_request"] < 6
