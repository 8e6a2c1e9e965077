"""The throughput benchmark's two load clients (loadtest/bench_http.py) count the same answers on both
routes, keep their connections alive, and report a refused request as a failure, not as an answer."""

from __future__ import annotations

import pytest

from sluicegate.loadtest.bench_http import CLIENTS, LeanHTTP, bench_http, run_on_loop
from sluicegate.loadtest.scenarios.throughput import one_chat, one_sse
from tests.helpers import Stack


@pytest.mark.parametrize("kind", CLIENTS)
def test_each_client_counts_every_token_on_both_routes_and_reports_a_refusal(stack: Stack, kind: str) -> None:
    async def calls() -> tuple[list[int], str]:
        http = bench_http(kind, 4)
        try:
            counts = [await one_chat(http, stack.base_url, f"bench-{kind}-1", 5),
                      await one_sse(http, stack.base_url, f"bench-{kind}-2", 7),
                      await one_chat(http, stack.base_url, f"bench-{kind}-1", 3)]
            if isinstance(http, LeanHTTP):  # one connection, kept between the calls
                (client,) = http._origins.values()
                assert len(client._idle) == 1
            try:
                await one_chat(http, stack.base_url, f"bench-{kind}-3", 0)  # max_tokens 0: refused
            except RuntimeError as error:
                refused = str(error)
            else:
                refused = ""
            return counts, refused
        finally:
            await http.aclose()

    counts, refused = run_on_loop(kind, calls)
    assert counts == [5, 7, 3]
    assert refused.startswith("chat: 422"), refused
